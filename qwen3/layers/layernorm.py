"""RMSNorm, with the fused residual form used between decoder layers."""

from __future__ import annotations

import torch
from torch import nn

from qwen3.kernels import use_triton_kernels
from qwen3.layers.weights import default_weight_loader


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in fp32 like the reference implementation."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]  # read by the loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``, the sum
        being the next layer's residual stream (saves one pass over the activations). On CUDA: one kernel."""
        if use_triton_kernels(x) and x.stride(-1) == 1:
            from qwen3.kernels.rms_norm import rms_norm  # triton is imported only on this path

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        summed = x + residual
        return self._norm(summed), summed
