"""Attention over the paged KV cache, behind one small interface with swappable backends.

Lazy exports: ``qwen3.attention.names`` is importable without torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen3.attention.backend import AttentionBackend, available_backends, create_backend

__all__ = ["AttentionBackend", "available_backends", "create_backend"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'qwen3.attention' has no attribute {name!r}")
    return getattr(importlib.import_module("qwen3.attention.backend"), name)
