"""SwiGLU's gate in one kernel: ``silu(gate) * up`` on a merged [T, 2 * d] projection.

Reference: ``qwen3.layers.activation.SiluAndMul`` (silu rounded to the input dtype, then the product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * d + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * d] (gate then up, last dimension contiguous) -> [T, d]. Graph-safe."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, 2 * d] with a contiguous last dimension, got {tuple(x.shape)}")
    t, d = x.shape[0], x.shape[1] // 2
    out = torch.empty((t, d), dtype=x.dtype, device=x.device)
    if t:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(t, triton.cdiv(d, block))](x, out, x.stride(0), d, BLOCK=block, num_warps=4)
    return out
