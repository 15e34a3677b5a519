"""Engine configuration: one frozen, validated dataclass; derived values are properties.

Torch-free at import (the service side and ``--help`` read it); the properties that answer in torch
types import torch when called, which only the engine core does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen3.attention.names import BACKEND_CHOICES
from qwen3.dtypes import DTYPE_NAMES, torch_dtype

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"  # "auto" = the checkpoint's torch_dtype (fp32 -> bf16 on CUDA is NOT applied)
    device: str = "auto"  # "auto" = cuda if available else cpu
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    max_num_seqs: int = 256  # most sequences in one step
    max_num_batched_tokens: int = 8192  # token budget of one step (prefill chunks + decodes)
    kv_block_size: int = 16
    gpu_memory_utilization: float = 0.90  # fraction of GPU memory the engine may use, KV cache included
    num_kv_blocks: int | None = None  # fixed KV pool size (CPU default: enough for 4 full-length sequences)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs
    attention_backend: str = "auto"  # auto | flash-attn | triton | torch
    max_waiting_requests: int = 1024  # backpressure: beyond this, new requests are refused
    seed: int = 0
    # Overlap the host's work for step N+1 (scheduling, input building) with the device's work for step N;
    # sampled ids reach the host one step later (and TP workers by a broadcast). None = on for CUDA.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise ValueError(f"model: {self.model!r} is not a directory")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda; got {self.device!r}")
        if self.device == "cuda" and not _cuda_available():
            raise ValueError("device is 'cuda' but no CUDA device is available")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode"
            )
        if self.kv_block_size < 1 or self.kv_block_size & (self.kv_block_size - 1):
            raise ValueError(f"kv_block_size must be a power of two, got {self.kv_block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.attention_backend not in BACKEND_CHOICES:
            raise ValueError(
                f"attention_backend must be one of {', '.join(BACKEND_CHOICES)}; got {self.attention_backend!r}"
            )
        if self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {self.max_waiting_requests}")

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def overlaps_steps(self) -> bool:
        """Whether the engine keeps one step in flight (``async_scheduling``, with its default resolved)."""
        if self.async_scheduling is None:
            return self.torch_device.type == "cuda"
        return self.async_scheduling

    def resolve_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        return checkpoint_dtype if self.dtype == "auto" else torch_dtype(self.dtype)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
