"""The attention op inside a decoder layer: hands q/k/v to the configured backend with this layer's KV cache."""

from __future__ import annotations

import torch
from torch import nn

from qwen3.attention.backend import AttentionBackend
from qwen3.forward_batch import ForwardBatch


class PagedAttention(nn.Module):
    """Holds no weights. ``k_cache``/``v_cache`` [num_blocks, block_size, Hkv, D] are views into the
    engine's KV pool, attached by the model runner after it has sized the pool."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend: AttentionBackend
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.backend = backend
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    @property
    def kv_cache_attached(self) -> bool:
        return self.k_cache.numel() > 0

    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, batch: ForwardBatch
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]. ``k = v = None``: the caller has already stored this
        step's K/V at ``batch.slot_mapping`` (the fused q/k-norm + RoPE + store kernel)."""
        if not self.kv_cache_attached:
            raise RuntimeError("KV cache not attached: the model runner must call allocate_kv_cache() before forward")
        if (k is None) != (v is None):
            raise ValueError("k and v must both be given, or both be None (already stored in the KV cache)")
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, batch, self.scale)
