"""SwiGLU's gate: SiLU(gate) * up on a merged [.., 2 * d] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3.kernels import use_triton_kernels


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, 2 * d] (gate then up) -> [T, d]
        if use_triton_kernels(x) and x.dim() == 2 and x.stride(1) == 1:
            from qwen3.kernels.silu_and_mul import silu_and_mul  # triton is imported only on this path

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
