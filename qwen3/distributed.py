"""Tensor-parallel process group: who am I, how many of us, and the collectives (the layers use two; the engine
one more).

The default ``torch.distributed`` group is the tensor-parallel group (one process per GPU, or per
CPU rank with gloo in tests). Without an initialised group everything degrades to world size 1, so
the model runs single-process with no setup at all.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: torch.device) -> None:
    """Join the TP group: NCCL on CUDA, gloo on CPU (so TP is testable without GPUs)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=10),
        **kwargs,
    )


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def tp_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator / denominator`` for sharding; a clear error when TP does not divide the size."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the TP group in place (no-op with one rank)."""
    if tp_world_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along its last dimension, in rank order."""
    world = tp_world_size()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Overwrite ``x`` on every rank with rank 0's ``x``, in place (no-op with one rank). On CUDA the
    copy is queued on the device like a kernel; the host does not wait for it."""
    if tp_world_size() > 1:
        dist.broadcast(x, src=0)
    return x


def destroy_tensor_parallel() -> None:
    """Leave the TP group, so that this process can build single-rank models (or another group) again."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
