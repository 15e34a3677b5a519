"""What a parameter's ``weight_loader`` receives: a checkpoint tensor that is read lazily.

Tensor-parallel ranks read only their shard: ``narrow`` on a safetensors slice reads just those
bytes from the file. Loaders check shapes and raise ``ValueError``; the checkpoint loader adds the
tensor and file names to the message.
"""

from __future__ import annotations

from typing import Protocol

import torch


class CheckpointTensor(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...

    def load(self) -> torch.Tensor: ...


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` with dtype conversion, refusing a shape mismatch instead of broadcasting."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"shape mismatch: checkpoint has {tuple(src.shape)}, the model expects {tuple(dst.shape)}")
    dst.copy_(src.to(dtype=dst.dtype))


def load_shard(
    param: torch.Tensor, source: CheckpointTensor, dim: int, shard_index: int, num_shards: int
) -> torch.Tensor:
    """Read shard ``shard_index`` of ``num_shards`` along ``dim`` of ``source``, checking its full size."""
    full = param.shape[dim] * num_shards
    if len(source.shape) != param.dim() or source.shape[dim] != full:
        expected = list(param.shape)
        expected[dim] = full
        raise ValueError(f"shape mismatch: checkpoint has {tuple(source.shape)}, the model expects {tuple(expected)}")
    size = param.shape[dim]
    return source.narrow(dim, shard_index * size, size)


def default_weight_loader(param: torch.Tensor, source: CheckpointTensor) -> None:
    """Replicated parameters: every rank loads the whole tensor."""
    copy_checked(param.data, source.load())
