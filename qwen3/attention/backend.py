"""The attention-backend contract and the registry that picks one.

KV cache layout, per layer: ``k_cache`` and ``v_cache`` of shape [num_blocks, block_size, Hkv, D]
(FlashAttention's paged layout). A token's slot is ``block * block_size + offset``.

A backend's ``forward`` stores the step's new K/V at ``batch.slot_mapping`` (unless ``k``/``v`` are None:
the caller's fused q/k-norm + RoPE kernel stored them already, ``qwen3.kernels.qk_norm_rope``) and then
computes causal attention for the new queries over each sequence's whole context (cached prefix + new tokens), read
through ``batch.block_tables``. ``AttentionBackend.forward`` does those two steps, once for every backend; a
backend supplies them as ``store_kv`` and ``attend``. Backends are registered by name and imported lazily, so a missing
GPU package only matters to the backend that needs it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from qwen3.attention.names import BACKEND_NAMES
from qwen3.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    name: str = "abstract"
    #: whether decode steps through this backend may be captured in CUDA graphs (no host-side reads of the batch)
    supports_cuda_graphs: bool = False
    #: activation/KV dtypes the backend computes in
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor | None,  # [T, Hkv, D], or None: already in the cache
        v: torch.Tensor | None,  # [T, Hkv, D], or None: already in the cache
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Store ``k``/``v`` into the cache (when given), then attend causally; see the module docstring.
        Attention reads keys and values only from the cache, never from ``k``/``v``."""
        if k is not None and v is not None:
            self.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        return self.attend(q, k_cache, v_cache, batch, scale)

    @staticmethod
    @abstractmethod
    def store_kv(
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        slot_mapping: torch.Tensor,  # [T] int64
    ) -> None:
        """Write token t's k/v into the caches at slot ``slot_mapping[t]``; a slot < 0 (padding) writes nothing."""

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Causal attention of the step's new queries over each sequence's cached context (this step's K/V
        already stored), read through ``batch.block_tables``."""


# name -> (module, class); a class may define unavailable_reason(device). "auto" takes the first of
# auto_order(device) that can run.
_REGISTRY: dict[str, tuple[str, str]] = {
    "torch": ("qwen3.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("qwen3.attention.triton_backend", "TritonAttentionBackend"),
    "flash-attn": ("qwen3.attention.flash_attn_backend", "FlashAttentionBackend"),
}
AUTO_ORDER = ("triton", "flash-attn", "torch")
# Preference by CUDA compute capability (major, minor), chosen by measurement; capabilities not listed use AUTO_ORDER.
# (9, 0), Hopper (H100, H200): triton. H200, 2026-12-02/03: decode attention 3.83 TB/s (91% of the measured copy
#   ceiling) against FA4's 2.84-2.95 (67-70%), and 19.8k vs 18.4k tok/s end to end; H100, 2026-11-25: decode
#   attention 92.4% vs 86.6% at block 16 (docs/BENCHMARKS.md). bench/attention_decode.py re-checks it every run.
# (10, x), Blackwell: flash-attn first: FlashAttention-4's main target, and this project's triton kernels were never
#   tuned there. Not measured here (no Blackwell machine lent): a lead, not a result.
AUTO_ORDER_BY_CAPABILITY: dict[tuple[int, int], tuple[str, ...]] = {
    (9, 0): ("triton", "flash-attn", "torch"),
    (10, 0): ("flash-attn", "triton", "torch"),
    (10, 3): ("flash-attn", "triton", "torch"),
}
assert set(_REGISTRY) == set(BACKEND_NAMES), "qwen3.attention.names lists every backend"


def _load(name: str) -> type[AttentionBackend]:
    module, cls = _REGISTRY[name]
    backend: type[AttentionBackend] = getattr(importlib.import_module(module), cls)
    return backend


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
        reason = (
            f"attention backend {name!r} computes in {supported}, not {str(dtype).removeprefix('torch.')} "
            "(choose another dtype or attention backend)"
        )
    return reason


def available_backends(device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
    return [n for n in _REGISTRY if backend_unavailable_reason(n, device, dtype) is None]


def auto_order(device: torch.device) -> tuple[str, ...]:
    """The order in which "auto" tries backends on ``device``: by compute capability on CUDA
    (``AUTO_ORDER_BY_CAPABILITY``), else ``AUTO_ORDER``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return AUTO_ORDER_BY_CAPABILITY.get(torch.cuda.get_device_capability(device), AUTO_ORDER)
    return AUTO_ORDER


def auto_backend_name(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend "auto" picks for ``device`` and ``dtype``: the first of ``auto_order(device)`` that can run."""
    for candidate in auto_order(device):
        if backend_unavailable_reason(candidate, device, dtype) is None:
            return candidate
    raise ValueError("no attention backend is available")  # torch always is; kept for clarity


def create_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> AttentionBackend:
    """Instantiate backend ``name`` for ``device`` and ``dtype`` ("auto": ``auto_backend_name``, the
    fastest measured backend for the GPU's compute capability that can run); a ValueError naming the
    reason if the named one cannot."""
    if name == "auto":
        return _load(auto_backend_name(device, dtype))()
    reason = backend_unavailable_reason(name, device, dtype)
    if reason is not None:
        raise ValueError(f"attention_backend: {reason}")
    return _load(name)()
