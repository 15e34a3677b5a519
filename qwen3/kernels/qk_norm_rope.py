"""Qwen3's per-head q/k RMSNorm followed by rotary embedding, for q and k together in one kernel.

Reference: ``q_norm``/``k_norm`` (``qwen3.layers.layernorm.RMSNorm`` over head_dim) then
``qwen3.layers.rotary.RotaryEmbedding`` (rotate-half), with the same rounding steps: every product and
sum the reference does in the activation dtype is rounded to that dtype here too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3.kernels import qk_norm_rope_supported


@triton.jit
def _norm_rope_heads(
    in_ptr,
    out_ptr,
    w_ptr,
    cos_sin_ptr,
    t,
    pos,
    stride_t,
    stride_h,
    n_heads,
    eps,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
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
    dst = out_ptr + t * n_heads * (2 * HALF) + h * (2 * HALF) + d
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,
    k_ptr,  # [T, Hq, D], [T, Hkv, D] (strided views of the qkv projection)
    q_out_ptr,
    k_out_ptr,  # contiguous outputs of the same shapes
    q_weight_ptr,
    k_weight_ptr,  # [D]
    cos_sin_ptr,
    positions_ptr,  # [max_position, D] fp32 (cos | sin), [T] int64
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    num_heads,
    num_kv_heads,
    eps,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t)
    if tl.program_id(1) == 0:
        _norm_rope_heads(
            q_ptr, q_out_ptr, q_weight_ptr, cos_sin_ptr, t, pos, stride_qt, stride_qh, num_heads, eps, HALF, BLOCK_HQ
        )
    else:
        _norm_rope_heads(
            k_ptr,
            k_out_ptr,
            k_weight_ptr,
            cos_sin_ptr,
            t,
            pos,
            stride_kt,
            stride_kh,
            num_kv_heads,
            eps,
            HALF,
            BLOCK_HKV,
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
    num_kv_heads = k.shape[1]
    q_out = torch.empty((t, num_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    if t:
        _qk_norm_rope_kernel[(t, 2)](
            q,
            k,
            q_out,
            k_out,
            q_weight,
            k_weight,
            cos_sin,
            positions,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            num_heads,
            num_kv_heads,
            eps,
            HALF=head_dim // 2,
            BLOCK_HQ=triton.next_power_of_2(num_heads),
            BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
            num_warps=4,
        )
    return q_out, k_out
