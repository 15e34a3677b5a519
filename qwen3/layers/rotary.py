"""Rotary position embedding (rotate-half convention, as Qwen3 is trained), with optional YaRN.

cos/sin are precomputed once for every position up to ``max_position`` and indexed by position id,
so a step costs one gather. YaRN follows Hugging Face's ``_compute_yarn_parameters`` exactly: blended
inverse frequencies and an attention factor folded into cos/sin.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qwen3.config import RopeScaling


def yarn_inv_freq(head_dim: int, base: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the cos/sin scale for YaRN."""
    factor = scaling.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(scaling.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp

    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep_extrapolation = 1 - ramp
    inv_freq = interpolation * (1 - keep_extrapolation) + extrapolation * keep_extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    cos_sin: torch.Tensor  # [max_position, head_dim]: cos then sin halves, a buffer (register_buffer below)

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        if scaling is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            attention_factor = 1.0
        else:
            inv_freq, attention_factor = yarn_inv_freq(head_dim, base, scaling)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [max_position, head_dim / 2]
        # Not a parameter, not in the state dict; moves with .to(device).
        self.register_buffer(
            "cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_factor, persistent=False
        )  # [max_position, head_dim]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, Hq, D]; k: [T, Hkv, D]
        cos, sin = self.cos_sin[positions].chunk(2, dim=-1)  # [T, D / 2] each
        cos = torch.cat([cos, cos], dim=-1).unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = torch.cat([sin, sin], dim=-1).unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
