"""Attention through this project's own Triton kernels (``qwen3.attention.kernels``).

Decode steps (one new token per sequence) use the split-K decode kernel, whose launch depends only on
tensor shapes, so they run inside the engine's CUDA graphs; every other step uses the varlen prefill
kernel, which handles fresh prompts, prefix-cache hits and chunked prefill alike.
"""

from __future__ import annotations

import torch

from qwen3.attention.backend import AttentionBackend
from qwen3.attention.kernels.common import ATTENTION_DTYPES, cuda_unavailable_reason
from qwen3.attention.kernels.decode_attention import paged_decode_attention
from qwen3.attention.kernels.prefill_attention import paged_prefill_attention
from qwen3.attention.kernels.store_kv import store_kv
from qwen3.forward_batch import ForwardBatch


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    dtypes = ATTENTION_DTYPES

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` (importing this module already proved triton is there)."""
        return cuda_unavailable_reason("triton", device)

    store_kv = staticmethod(store_kv)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float
    ) -> torch.Tensor:  # [T, Hq, D]; shapes as in AttentionBackend.attend
        if batch.is_decode:
            # T == B: token i is sequence i's only new token. Reads no host copies of the batch.
            return paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, scale)
        return paged_prefill_attention(
            q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, batch.max_query_len, scale
        )
