"""Qwen3's per-head q/k RMSNorm followed by rotary embedding, for q and k together in one kernel, and
optionally the KV-cache store of the same step in that launch.

Reference: ``q_norm``/``k_norm`` (``qwen3.layers.layernorm.RMSNorm`` over head_dim) then
``qwen3.layers.rotary.RotaryEmbedding`` (rotate-half), with the same rounding steps: every product and
sum the reference does in the activation dtype is rounded to that dtype here too. With the caches given,
the rotated k and the untouched v go straight to the paged KV cache at ``slot_mapping`` (the reference:
``qwen3.attention.torch_backend.store_kv``), so rotated k is never written to a temporary and the
backends' separate store kernel is not launched: one launch per layer fewer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3.attention.kernels.common import check_index, check_kv_cache, check_tokens, kv_store_strides
from qwen3.attention.kernels.store_kv import paged_slot_offset
from qwen3.kernels import qk_norm_rope_supported


@triton.jit
def _norm_rope_heads(in_ptr, w_ptr, cos_sin_ptr, t, pos, stride_t, stride_h, n_heads, eps, HALF, BLOCK_H):
    """Normalise and rotate the ``n_heads`` heads of token ``t``; returns the two rotated halves
    [BLOCK_H, HALF] each (rows >= n_heads are garbage and must be masked by the caller)."""
    h = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, HALF)[None, :]  # [1, HALF]
    mask = h < n_heads
    src = in_ptr + t * stride_t + h * stride_h + d
    x1 = tl.load(src, mask=mask, other=0.0)  # first half of each head   [BLOCK_H, HALF]
    x2 = tl.load(src + HALF, mask=mask, other=0.0)  # second half
    dtype = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / (2 * HALF) + eps)  # [BLOCK_H]
    w1 = tl.load(w_ptr + d).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
    n1 = ((x1f * rstd[:, None]).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
    n2 = ((x2f * rstd[:, None]).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    cos = tl.load(cos_sin_ptr + pos * (2 * HALF) + d).to(dtype).to(tl.float32)  # [1, HALF]
    sin = tl.load(cos_sin_ptr + pos * (2 * HALF) + HALF + d).to(dtype).to(tl.float32)
    # rotate-half: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], each product rounded like the reference
    o1 = ((n1 * cos).to(dtype).to(tl.float32) + (-n2 * sin).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((n2 * cos).to(dtype).to(tl.float32) + (n1 * sin).to(dtype).to(tl.float32)).to(dtype)
    return o1, o2


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,
    k_ptr,
    v_ptr,  # [T, Hq, D], [T, Hkv, D], [T, Hkv, D] (strided views of the qkv projection)
    q_out_ptr,
    k_out_ptr,  # contiguous [T, Hq, D], [T, Hkv, D]; k_out unused when STORE_KV
    k_cache_ptr,
    v_cache_ptr,  # [num_blocks, PAGE_SIZE, Hkv, D], one set of strides for both; used when STORE_KV
    slot_ptr,  # [T] int64, slot < 0 = skip; used when STORE_KV
    q_weight_ptr,
    k_weight_ptr,  # [D]
    cos_sin_ptr,
    positions_ptr,  # [max_position, D] fp32 (cos | sin), [T] int64
    stride_qt,
    stride_qh,
    kv_strides,  # kv_store_strides: (k token, k head, v token, v head, cache block, cache slot, cache head)
    num_heads,
    num_kv_heads,
    eps,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    STORE_KV: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cache_block, stride_cache_slot, stride_cache_head = kv_strides
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t)
    if tl.program_id(1) == 0:
        # Names differ from the other branch's: Triton requires a name bound in both branches of a
        # runtime `if` to have one type, and the q and kv tiles have different shapes.
        q1, q2 = _norm_rope_heads(
            q_ptr, q_weight_ptr, cos_sin_ptr, t, pos, stride_qt, stride_qh, num_heads, eps, HALF, BLOCK_HQ
        )
        hq = tl.arange(0, BLOCK_HQ)[:, None]
        dq = tl.arange(0, HALF)[None, :]
        q_dst = q_out_ptr + t * num_heads * (2 * HALF) + hq * (2 * HALF) + dq
        tl.store(q_dst, q1, mask=hq < num_heads)
        tl.store(q_dst + HALF, q2, mask=hq < num_heads)
    else:
        h = tl.arange(0, BLOCK_HKV)[:, None]
        d = tl.arange(0, HALF)[None, :]
        mask = h < num_kv_heads
        if STORE_KV:
            slot = tl.load(slot_ptr + t)
            if slot >= 0:  # slot < 0: a padding row of a CUDA-graph batch, which must not write the cache
                o1, o2 = _norm_rope_heads(
                    k_ptr, k_weight_ptr, cos_sin_ptr, t, pos, stride_kt, stride_kh, num_kv_heads, eps, HALF, BLOCK_HKV
                )
                dst = paged_slot_offset(slot, stride_cache_block, stride_cache_slot, PAGE_SIZE)
                dst += h * stride_cache_head + d  # [BLOCK_HKV, HALF]
                tl.store(k_cache_ptr + dst, o1.to(k_cache_ptr.dtype.element_ty), mask=mask)
                tl.store(k_cache_ptr + dst + HALF, o2.to(k_cache_ptr.dtype.element_ty), mask=mask)
                src = v_ptr + t * stride_vt + h * stride_vh + d
                v1 = tl.load(src, mask=mask)
                v2 = tl.load(src + HALF, mask=mask)
                tl.store(v_cache_ptr + dst, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
                tl.store(v_cache_ptr + dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)
        else:
            o1, o2 = _norm_rope_heads(
                k_ptr, k_weight_ptr, cos_sin_ptr, t, pos, stride_kt, stride_kh, num_kv_heads, eps, HALF, BLOCK_HKV
            )
            dst = k_out_ptr + t * num_kv_heads * (2 * HALF) + h * (2 * HALF) + d
            tl.store(dst, o1, mask=mask)
            tl.store(dst + HALF, o2, mask=mask)


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor
) -> tuple[int, int, int, int]:
    """Validate q [T, Hq, D], k [T, Hkv, D], the cos/sin table and positions; returns (T, Hq, Hkv, D)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got {tuple(q.shape)}")
    t, num_heads, head_dim = q.shape
    if k.dim() != 3 or k.shape[0] != t or k.shape[2] != head_dim:
        raise ValueError(f"k must be [{t}, Hkv, {head_dim}], got {tuple(k.shape)}")
    if not qk_norm_rope_supported(head_dim):
        raise ValueError(f"head_dim must be twice a power of two, got {head_dim}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k must be contiguous in the head dimension")
    if cos_sin.dtype != torch.float32 or cos_sin.dim() != 2 or cos_sin.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin must be float32 [max_position, {head_dim}], got {cos_sin.dtype} {tuple(cos_sin.shape)}"
        )
    if positions.dtype != torch.int64 or positions.shape != (t,):
        raise ValueError(f"positions must be int64 [{t}], got {positions.dtype} {tuple(positions.shape)}")
    return t, num_heads, k.shape[1], head_dim


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    store_kv: bool,
) -> None:
    t, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if not t:
        return
    _qk_norm_rope_kernel[(t, 2)](
        q,
        k,
        v,
        q_out,
        k_out,
        k_cache,
        v_cache,
        slot_mapping,
        q_weight,
        k_weight,
        cos_sin,
        positions,
        q.stride(0),
        q.stride(1),
        kv_store_strides(k, v, k_cache if store_kv else None),
        num_heads,
        num_kv_heads,
        eps,
        HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        STORE_KV=store_kv,
        PAGE_SIZE=k_cache.shape[1] if store_kv else 1,
        num_warps=4,
    )


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm then rotary on q [T, Hq, D] and k [T, Hkv, D] -> new contiguous (q, k).

    ``cos_sin`` [max_position, D] float32 holds cos in its first half and sin in its second (YaRN's
    attention factor folded in); ``positions`` [T] int64 must be < max_position (not checked: that
    would read the device). Graph-safe.
    """
    t, num_heads, num_kv_heads, head_dim = _check_inputs(q, k, cos_sin, positions)
    q_out = torch.empty((t, num_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    _launch(q, k, k, q_out, k_out, q, q, positions, q_weight, k_weight, eps, cos_sin, positions, store_kv=False)
    return q_out, k_out


def qk_norm_rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """``qk_norm_rope`` and the KV-cache store in one launch; returns the new contiguous q [T, Hq, D].

    The rotated k and ``v`` [T, Hkv, D] go to ``k_cache``/``v_cache`` [num_blocks, block_size, Hkv, D]
    (the layout every attention backend reads, ``qwen3.attention.backend``) at ``slot_mapping`` [T]
    int64; a slot < 0 stores nothing. Slots must be < num_blocks * block_size (not checked: that would
    read the device). Graph-safe (grid = T).
    """
    t, num_heads, num_kv_heads, head_dim = _check_inputs(q, k, cos_sin, positions)
    _, _, cache_heads, cache_dim = check_kv_cache(k_cache, v_cache)
    if (cache_heads, cache_dim) != (num_kv_heads, head_dim):
        raise ValueError(f"k_cache holds {cache_heads} heads of {cache_dim}, k has {num_kv_heads} heads of {head_dim}")
    check_tokens("k", k, num_kv_heads, head_dim, k_cache.dtype, k_cache.device)
    check_tokens("v", v, num_kv_heads, head_dim, k_cache.dtype, k_cache.device)
    if v.shape[0] != t:
        raise ValueError(f"v has {v.shape[0]} tokens, q has {t}")
    check_index("slot_mapping", slot_mapping, torch.int64, (t,), k_cache.device)
    q_out = torch.empty((t, num_heads, head_dim), dtype=q.dtype, device=q.device)
    _launch(
        q,
        k,
        v,
        q_out,
        q_out,
        k_cache,
        v_cache,
        slot_mapping,
        q_weight,
        k_weight,
        eps,
        cos_sin,
        positions,
        store_kv=True,
    )
    return q_out
