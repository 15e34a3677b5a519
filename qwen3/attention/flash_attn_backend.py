"""Attention through FlashAttention-4 (``flash_attn.cute``, the ``flash-attn-4`` package).

The KV store is this project's Triton kernel (``kernels.store_kv``); attention is one FlashAttention call
over the paged cache for prefill and decode alike (varlen queries, ``seqused_k`` = context lengths,
``page_table`` = block tables, GQA, causal aligned to the end of each context).

FlashAttention-4 (``flash-attn-4``, checked against 4.0.0b36's ``flash_attn/cute/interface.py``):
- paged KV on Hopper (sm_90) and Blackwell (sm_100/sm_110) only; sm_80 and sm_120 assert
  ``page_table is None``. Any page size: pages of exactly one key tile (128 for head_dim 128 on sm_90)
  load by TMA, others by a cp.async gather, so block sizes 16 and 256 both work.
- with TMA-loaded pages, rows past ``seqused_k`` in a sequence's last page are read and must be finite
  (their scores are masked, but 0 * NaN is NaN). The engine's cache is zero-initialised and only
  ever holds stored K/V, so this holds; a test that poisons unused slots with NaN must not use FA.
- a call does ~100 us of Python work (argument checks, compile-cache lookup), so decode belongs in
  CUDA graphs. Its launch depends only on shapes and host ints we pass (``max_seqlen_q`` = 1 for
  decode; ``max_seqlen_k`` defaults to the page-table width times the page size), and it neither
  synchronises nor reads the device, so ``supports_cuda_graphs`` is True. Each shape compiles once
  (JIT, seconds) on first use: the engine's warm-up runs before capture.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from qwen3.attention.backend import AttentionBackend
from qwen3.attention.kernels.common import ATTENTION_DTYPES, cuda_unavailable_reason
from qwen3.attention.kernels.store_kv import store_kv
from qwen3.forward_batch import ForwardBatch

#: compute-capability majors where FlashAttention-4 has a paged-KV forward kernel
FA4_PAGED_KV_ARCHS = (9, 10, 11)


@functools.cache
def _find_flash_attn() -> ModuleType | str:
    """``flash_attn.cute``, or a message saying why it does not import."""
    try:
        return importlib.import_module("flash_attn.cute")
    except ImportError as exc:
        return f"flash-attn-4 (flash_attn.cute) is not importable: {exc}"


class FlashAttentionBackend(AttentionBackend):
    name = "flash-attn"
    supports_cuda_graphs = True  # see the module docstring
    dtypes = ATTENTION_DTYPES

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        reason = cuda_unavailable_reason("flash-attn", device)
        if reason is not None:
            return reason
        found = _find_flash_attn()
        if isinstance(found, str):
            return found
        major, minor = torch.cuda.get_device_capability(device)
        if major not in FA4_PAGED_KV_ARCHS:
            return (
                f"FlashAttention-4 has no paged-KV kernel for sm_{major}{minor}; it needs Hopper (sm_90) "
                "or Blackwell (sm_100/sm_110)"
            )
        return None

    def __init__(self) -> None:
        found = _find_flash_attn()
        if isinstance(found, str):
            raise ValueError(f"attention backend 'flash-attn': {found}")
        self._module = found

    store_kv = staticmethod(store_kv)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float
    ) -> torch.Tensor:  # [T, Hq, D]; shapes as in AttentionBackend.attend
        out, _lse = self._module.flash_attn_varlen_func(
            q,
            k_cache,
            v_cache,
            cu_seqlens_q=batch.query_start_loc,  # [B + 1] int32
            max_seqlen_q=batch.max_query_len,  # host int: 1 for every decode step (graph-safe)
            seqused_k=batch.seq_lens,  # [B] int32: context length including the new tokens
            page_table=batch.block_tables,  # [B, max_blocks] int32
            softmax_scale=scale,
            causal=True,  # bottom-right aligned: new tokens are the context's last
        )
        return out  # [T, Hq, D]
