"""Attention through FlashAttention: FlashAttention-4 (``flash_attn.cute``) where installed, else FA2.

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

FlashAttention-2 (the classic ``flash-attn`` package) is a thin fallback that can be neither run nor
tested here or on the lent device (it is not installable there): ``flash_attn_varlen_func`` with
``block_table`` for prefill, ``flash_attn_with_kvcache`` for decode. Upstream FA2 requires the block
size to be a multiple of 256, and since graph capture of this adapter is unverified it declares
``supports_cuda_graphs = False``.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch
import torch.nn.functional as F

from qwen3.attention.backend import AttentionBackend
from qwen3.attention.kernels.common import ATTENTION_DTYPES, cuda_unavailable_reason
from qwen3.attention.kernels.store_kv import store_kv
from qwen3.forward_batch import ForwardBatch

#: compute-capability majors where FlashAttention-4 has a paged-KV forward kernel
FA4_PAGED_KV_ARCHS = (9, 10, 11)
#: upstream FlashAttention-2 checks ``page_block_size % 256 == 0`` for paged KV
FA2_PAGE_MULTIPLE = 256


@functools.cache
def _find_flash_attn() -> tuple[str, ModuleType] | str:
    """("fa4", flash_attn.cute) or ("fa2", flash_attn), or a message saying why neither imports."""
    try:
        return "fa4", importlib.import_module("flash_attn.cute")
    except ImportError as exc:
        fa4_error = exc
    try:
        module = importlib.import_module("flash_attn")
    except ImportError as exc:
        return f"neither flash-attn-4 (flash_attn.cute: {fa4_error}) nor flash-attn 2 ({exc}) is importable"
    if not hasattr(module, "flash_attn_with_kvcache"):
        return f"flash_attn.cute is not importable ({fa4_error}) and {module.__name__} is not FlashAttention-2"
    return "fa2", module


class FlashAttentionBackend(AttentionBackend):
    name = "flash-attn"
    supports_cuda_graphs = True  # FlashAttention-4; an FA2 instance sets it False (see the module docstring)
    dtypes = ATTENTION_DTYPES

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        reason = cuda_unavailable_reason("flash-attn", device)
        if reason is not None:
            return reason
        found = _find_flash_attn()
        if isinstance(found, str):
            return found
        if found[0] == "fa4":
            major, minor = torch.cuda.get_device_capability(device)
            if major not in FA4_PAGED_KV_ARCHS:
                return (f"FlashAttention-4 has no paged-KV kernel for sm_{major}{minor}; it needs Hopper (sm_90) "
                        "or Blackwell (sm_100/sm_110)")
        return None

    def __init__(self) -> None:
        found = _find_flash_attn()
        if isinstance(found, str):
            raise ValueError(f"attention backend 'flash-attn': {found}")
        self.flavor, self._module = found
        if self.flavor == "fa2":
            self.supports_cuda_graphs = False

    def forward(
        self,
        q: torch.Tensor,        # [T, Hq, D]
        k: torch.Tensor,        # [T, Hkv, D]
        v: torch.Tensor,        # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:          # [T, Hq, D]
        store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        if self.flavor == "fa4":
            return self._fa4(q, k_cache, v_cache, batch, scale)
        return self._fa2(q, k_cache, v_cache, batch, scale)

    def _fa4(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
             scale: float) -> torch.Tensor:
        out, _lse = self._module.flash_attn_varlen_func(
            q, k_cache, v_cache,
            cu_seqlens_q=batch.query_start_loc,  # [B + 1] int32
            max_seqlen_q=batch.max_query_len,    # host int: 1 for every decode step (graph-safe)
            seqused_k=batch.seq_lens,            # [B] int32: context length including the new tokens
            page_table=batch.block_tables,       # [B, max_blocks] int32
            softmax_scale=scale,
            causal=True,                         # bottom-right aligned: new tokens are the context's last
        )
        return out  # [T, Hq, D]

    def _fa2(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
             scale: float) -> torch.Tensor:
        """Untested adapter (FA2 is not installable on any machine this project runs on)."""
        block_size = k_cache.shape[1]
        if block_size % FA2_PAGE_MULTIPLE:
            raise ValueError(f"block_size {block_size}: FlashAttention-2's paged KV cache needs a multiple of "
                             f"{FA2_PAGE_MULTIPLE}; set kv_block_size to 256 or choose another attention backend")
        if batch.is_decode:
            out = self._module.flash_attn_with_kvcache(
                q.unsqueeze(1), k_cache, v_cache,  # q as [B, 1, Hq, D]
                cache_seqlens=batch.seq_lens, block_table=batch.block_tables, softmax_scale=scale, causal=True,
            )
            return out.squeeze(1)
        cu_seqlens_k = F.pad(torch.cumsum(batch.seq_lens, 0, dtype=torch.int32), (1, 0))  # [B + 1]
        return self._module.flash_attn_varlen_func(
            q, k_cache, v_cache, batch.query_start_loc, cu_seqlens_k, batch.max_query_len, batch.max_seq_len,
            softmax_scale=scale, causal=True, block_table=batch.block_tables,
        )
