"""Attention over the paged KV cache, behind one small interface with swappable backends."""

from qwen3.attention.backend import AttentionBackend, available_backends, create_backend

__all__ = ["AttentionBackend", "available_backends", "create_backend"]
