"""Scatter the step's new keys and values into the paged KV cache.

Reference: ``qwen3.attention.torch_backend.store_kv``. Token ``t`` goes to slot ``slot_mapping[t]``
(= block * block_size + offset); a negative slot (padding rows of a CUDA-graph batch) is skipped, so
padding never writes the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3.attention.kernels.common import check_index, check_kv_cache, check_tokens, kv_store_strides


@triton.jit
def paged_slot_offset(slot, stride_cache_block, stride_cache_slot, PAGE_SIZE: tl.constexpr):
    """Element offset of cache slot ``slot`` (int64: a KV pool can exceed 2**31 elements per layer) in a cache
    [num_blocks, PAGE_SIZE, Hkv, D]; add ``head * stride_cache_head + dim`` for an element. Both store paths
    (this module's kernel and ``qwen3.kernels.qk_norm_rope``'s fused store) address the cache through it."""
    return (slot // PAGE_SIZE) * stride_cache_block + (slot % PAGE_SIZE) * stride_cache_slot


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,  # [T, Hkv, D]
    k_cache_ptr,
    v_cache_ptr,  # [num_blocks, PAGE_SIZE, Hkv, D], one set of strides for both
    slot_ptr,  # [T] int64
    kv_strides,  # kv_store_strides: (k token, k head, v token, v head, cache block, cache slot, cache head)
    num_kv_heads,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cache_block, stride_cache_slot, stride_cache_head = kv_strides
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)  # int64
    if slot < 0:  # padding token: nothing to store
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < num_kv_heads) & (d[None, :] < HEAD_DIM)  # [BLOCK_H, BLOCK_D]
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    dst = paged_slot_offset(slot, stride_cache_block, stride_cache_slot, PAGE_SIZE)
    dst = dst + h[:, None] * stride_cache_head + d[None, :]  # [BLOCK_H, BLOCK_D]
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``k``/``v`` [T, Hkv, D] into ``k_cache``/``v_cache`` [num_blocks, block_size, Hkv, D] at
    ``slot_mapping`` [T] int64; slots < 0 are skipped. One program per token; graph-safe (grid = T).

    Slots must be < num_blocks * block_size (not checked: that would read the device).
    """
    _, block_size, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    check_tokens("k", k, num_kv_heads, head_dim, k_cache.dtype, k_cache.device)
    check_tokens("v", v, num_kv_heads, head_dim, k_cache.dtype, k_cache.device)
    num_tokens = k.shape[0]
    if v.shape[0] != num_tokens:
        raise ValueError(f"v has {v.shape[0]} tokens, k has {num_tokens}")
    check_index("slot_mapping", slot_mapping, torch.int64, (num_tokens,), k_cache.device)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        kv_store_strides(k, v, k_cache),
        num_kv_heads,
        PAGE_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
