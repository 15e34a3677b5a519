"""RMSNorm over the last dimension, optionally fused with the residual add before it: one pass, one kernel.

Reference: ``qwen3.layers.layernorm.RMSNorm`` (the same rounding steps: the sum rounded to the input
dtype, the normalisation in fp32 rounded to the input dtype, then the weight product rounded again).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,  # x, residual: [R, N] (row stride given); weight: [N]
    out_ptr,
    residual_out_ptr,  # [R, N] contiguous
    stride_x,
    stride_r,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual stream keeps the input dtype
        tl.store(residual_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    normed = (xf * rstd).to(x.dtype)
    tl.store(out_ptr + row * n_cols + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)`` or, with ``residual``, ``(norm(x + residual), x + residual)``.

    x, residual: [..., N] with a contiguous last dimension; weight: [N] in x's dtype. Outputs are new
    contiguous tensors of x's shape. Graph-safe (no host reads).
    """
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n},)")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    x2 = x.reshape(-1, n)  # a view whenever the leading dims can be flattened
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = out
    r2 = x2
    if residual is not None:
        if residual.shape != x.shape or residual.stride(-1) != 1:
            raise ValueError(f"residual must match x's shape {tuple(x.shape)} with a contiguous last dimension")
        r2 = residual.reshape(-1, n)
        residual_out = torch.empty_like(out)
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows,)](
            x2,
            r2,
            weight,
            out,
            residual_out,
            x2.stride(0),
            r2.stride(0),
            n,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_N=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return out if residual is None else (out, residual_out)
