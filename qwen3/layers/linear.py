"""Tensor-parallel linear layers (Megatron style), ``Y = X A^T + b`` with ``A`` of shape [out, in].

- ``ColumnParallelLinear``: ``A`` split along ``out`` (dim 0); each rank yields its slice of ``Y``.
- ``MergedColumnParallelLinear``: several column-parallel matrices stacked (gate + up), each split.
- ``QKVParallelLinear``: q, k and v projections stacked, each split by heads.
- ``RowParallelLinear``: ``A`` split along ``in`` (dim 1); partial products are all-reduced.

Each parameter carries ``weight_loader(param, source, shard_id=None)`` so the generic checkpoint
loader needs no knowledge of the layer. Every product goes through :func:`linear`: decode-sized inputs
(at most ``GEMV_LAYER_MAX_M`` rows: batch 1) on CUDA take the Triton GEMV, everything else ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3.distributed import all_reduce, divide, tp_rank, tp_world_size
from qwen3.kernels import use_gemv
from qwen3.layers.weights import CheckpointTensor, copy_checked, default_weight_loader, load_shard


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; x [M, K] with M <= GEMV_LAYER_MAX_M on CUDA runs the small-M Triton GEMV
    (weight-read bound decode steps; ``QWEN3_GEMV=0`` turns it off). Graph-safe either way."""
    if use_gemv(x, weight):
        from qwen3.kernels.gemv import gemv  # triton is imported only on this path

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class ColumnParallelLinear(nn.Module):
    """Output features split across ranks: weight [output_size / tp, input_size]."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_world_size()
        local_out = divide(output_size, self.tp_size, "output size")
        self.weight = nn.Parameter(torch.empty(local_out, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, source: CheckpointTensor, shard_id: object = None) -> None:
        copy_checked(param.data, load_shard(param, source, 0, self.tp_rank, self.tp_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul; checkpoint tensor ``i`` fills part ``shard_id=i``."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, source: CheckpointTensor, shard_id: object = None) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard id {shard_id!r} is not one of 0..{len(self.output_sizes) - 1}")
        local_sizes = [divide(s, self.tp_size, "output size") for s in self.output_sizes]
        offset = sum(local_sizes[:shard_id])
        dst = param.data.narrow(0, offset, local_sizes[shard_id])
        copy_checked(dst, load_shard(dst, source, 0, self.tp_rank, self.tp_size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections stacked along the output: [(q_heads + 2 * kv_heads) / tp * head_dim, hidden]."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        tp = tp_world_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp, "number of attention heads")
        self.num_kv_heads = divide(num_kv_heads, tp, "number of key/value heads")
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, source: CheckpointTensor, shard_id: object = None) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        spans = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
        if shard_id not in spans:
            raise ValueError(f"shard id {shard_id!r} is not one of 'q', 'k', 'v'")
        offset, size = spans[shard_id]
        dst = param.data.narrow(0, offset, size)
        copy_checked(dst, load_shard(dst, source, 0, self.tp_rank, self.tp_size))


class RowParallelLinear(nn.Module):
    """Input features split across ranks: weight [output_size, input_size / tp]; outputs all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_world_size()
        local_in = divide(input_size, self.tp_size, "input size")
        self.weight = nn.Parameter(torch.empty(output_size, local_in), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: nn.Parameter, source: CheckpointTensor, shard_id: object = None) -> None:
        copy_checked(param.data, load_shard(param, source, 1, self.tp_rank, self.tp_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(linear(x, self.weight))  # the one collective of this layer: sum of partial products
        return y if self.bias is None else y + self.bias
