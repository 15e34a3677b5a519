"""Qwen3 for serving: config, tensor-parallel layers, paged-KV attention backends and a safetensors loader.

The names below load lazily, so that torch-free modules of this package (``qwen3.dtypes``,
``qwen3.attention.names``) can be imported by the services' option parsers without importing torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen3.config import ConfigError, Qwen3Config
    from qwen3.forward_batch import ForwardBatch
    from qwen3.loader import CheckpointError, load_checkpoint
    from qwen3.model import Qwen3ForCausalLM

_EXPORTS = {
    "ConfigError": "qwen3.config",
    "Qwen3Config": "qwen3.config",
    "ForwardBatch": "qwen3.forward_batch",
    "CheckpointError": "qwen3.loader",
    "load_checkpoint": "qwen3.loader",
    "Qwen3ForCausalLM": "qwen3.model",
}
__all__ = ["CheckpointError", "ConfigError", "ForwardBatch", "Qwen3Config", "Qwen3ForCausalLM", "load_checkpoint"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qwen3' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
