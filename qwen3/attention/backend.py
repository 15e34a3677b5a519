"""The attention-backend contract and the registry that picks one.

KV cache layout, per layer: ``k_cache`` and ``v_cache`` of shape [num_blocks, block_size, Hkv, D]
(FlashAttention's paged layout). A token's slot is ``block * block_size + offset``.

A backend's ``forward`` stores the step's new K/V at ``batch.slot_mapping`` and then computes causal
attention for the new queries over each sequence's whole context (cached prefix + new tokens), read
through ``batch.block_tables``. Backends are registered by name and imported lazily, so a missing
GPU package only matters to the backend that needs it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Callable

import torch

from qwen3.attention.names import BACKEND_NAMES
from qwen3.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    name: str = "abstract"
    #: whether decode steps through this backend may be captured in CUDA graphs (no host-side reads of the batch)
    supports_cuda_graphs: bool = False
    #: activation/KV dtypes the backend computes in
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,        # [T, Hq, D]
        k: torch.Tensor,        # [T, Hkv, D]
        v: torch.Tensor,        # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:          # [T, Hq, D]
        """Store ``k``/``v`` into the cache, then attend causally; see the module docstring."""


# name -> (module, class); a class may define unavailable_reason(device). "auto" takes the first of AUTO_ORDER that can run.
_REGISTRY: dict[str, tuple[str, str]] = {
    "torch": ("qwen3.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("qwen3.attention.triton_backend", "TritonAttentionBackend"),
    "flash-attn": ("qwen3.attention.flash_attn_backend", "FlashAttentionBackend"),
}
AUTO_ORDER = ("flash-attn", "triton", "torch")
assert set(_REGISTRY) == set(BACKEND_NAMES), "qwen3.attention.names lists every backend"


def _load(name: str) -> type[AttentionBackend]:
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def backend_unavailable_reason(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (in ``dtype``, when given), or None if it can."""
    if name not in _REGISTRY:
        return f"unknown attention backend {name!r}; choose from auto, {', '.join(_REGISTRY)}"
    try:
        backend_cls = _load(name)
    except ImportError as exc:
        return f"attention backend {name!r} is not installed ({exc})"
    check: Callable[[torch.device], str | None] | None = getattr(backend_cls, "unavailable_reason", None)
    reason = check(device) if check else None
    if reason is None and dtype is not None and dtype not in backend_cls.dtypes:
        supported = ", ".join(str(d).removeprefix("torch.") for d in backend_cls.dtypes)
        reason = (f"attention backend {name!r} computes in {supported}, not {str(dtype).removeprefix('torch.')} "
                  "(choose another dtype or attention backend)")
    return reason


def available_backends(device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
    return [n for n in _REGISTRY if backend_unavailable_reason(n, device, dtype) is None]


def create_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> AttentionBackend:
    """Instantiate backend ``name`` for ``device`` and ``dtype`` ("auto" picks flash-attn, then triton, then
    torch, the first that can run); a ValueError naming the reason if the named one cannot."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            if backend_unavailable_reason(candidate, device, dtype) is None:
                return _load(candidate)()
        raise ValueError("no attention backend is available")  # torch always is; kept for clarity
    reason = backend_unavailable_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(f"attention_backend: {reason}")
    return _load(name)()
