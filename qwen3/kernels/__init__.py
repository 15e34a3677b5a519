"""Fused Triton kernels for the element-wise parts of a decoder layer (the attention kernels live in
``qwen3.attention.kernels``).

Unfused, RMSNorm, Qwen3's q/k norms, rotary and SiLU-and-multiply cost ~45 small kernels per layer:
at batch 1 that is ~1,300 launches (~2.5 ms of GPU time on an H100) per decode step, more than the
weights' own read time. Fused they are four kernels per layer (see docs/BENCHMARKS.md).

The layers call :func:`use_triton_kernels` on their input: the kernels run on CUDA tensors when triton
is importable; everything else (CPU, the tests' fp32 references) runs the PyTorch path, which stays
the definition. ``QWEN3_TORCH_ELEMENTWISE=1`` in the environment when the process starts forces the
PyTorch path everywhere (for A/B runs; read once).

Switches for the decode-path kernels, each read once at first use, each defaulting to on (set to ``0`` to
turn one off for an A/B run or if a GPU run shows a regression):
- ``QWEN3_FUSED_KV_STORE``: the q/k-norm + RoPE kernel also writes k and v into the paged KV cache
  (``qk_norm_rope.qk_norm_rope_store_kv``), instead of the attention backend's separate store kernel;
- ``QWEN3_GEMV``: linear layers with at most ``GEMV_MAX_M`` rows run the small-M Triton GEMV
  (``gemv.gemv``) instead of cuBLAS;
- ``QWEN3_GEMV_SILU``: where the GEMV serves the MLP's merged gate/up projection, it also applies
  SiLU-and-multiply before storing (one launch and one [M, 2 * intermediate] round trip fewer per layer).

``QWEN3_PDL=1`` (default 0, opt in: never yet run on a GPU) launches the GEMV with programmatic dependent launch
(Hopper and later), so its weight loads start while the previous kernel finishes.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def fused_elementwise_enabled() -> bool:
    """Whether CUDA tensors take the fused kernels: triton importable and not switched off by
    ``QWEN3_TORCH_ELEMENTWISE=1``."""
    return importlib.util.find_spec("triton") is not None and os.environ.get("QWEN3_TORCH_ELEMENTWISE") != "1"


def _switch_on(name: str, default: str = "1") -> bool:
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"environment variable {name} must be 0 or 1, got {value!r}")
    return value == "1"


@functools.cache
def fused_kv_store_enabled() -> bool:
    """Whether the fused q/k-norm + RoPE kernel stores K/V into the cache (``QWEN3_FUSED_KV_STORE``, default 1)."""
    return fused_elementwise_enabled() and _switch_on("QWEN3_FUSED_KV_STORE")


@functools.cache
def gemv_enabled() -> bool:
    """Whether small-M linear layers on CUDA take the Triton GEMV (``QWEN3_GEMV``, default 1)."""
    return importlib.util.find_spec("triton") is not None and _switch_on("QWEN3_GEMV")


@functools.cache
def gemv_silu_enabled() -> bool:
    """Whether the MLP's gate/up GEMV also applies SiLU-and-multiply in its epilogue (``QWEN3_GEMV_SILU``, default 1;
    only where the GEMV runs at all)."""
    return _switch_on("QWEN3_GEMV_SILU")


@functools.cache
def pdl_enabled() -> bool:
    """Whether the GEMV launches with programmatic dependent launch (``QWEN3_PDL``, default 0: not yet measured)."""
    return _switch_on("QWEN3_PDL", default="0")


def use_triton_kernels(x: torch.Tensor) -> bool:
    """True when ``x`` lives on a CUDA device and the fused Triton kernels can serve it."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and fused_elementwise_enabled()


#: the most rows the small-M GEMV kernel serves (its tests and bench/gemv.py cover 1..8)
GEMV_MAX_M = 8
#: the most rows the linear layers send to it. Measured on the H200 (2026-12-03, bench/gemv.py): at M = 1 it
#: takes batch-1 decode from 1.394 to 1.138 ms/token (0.6B), but its tl.dot path for M = 2..8 runs at a
#: third of cuBLAS's speed (0.6B M = 8: 3.62 vs 1.20 ms a token over all layers), so those stay on cuBLAS
#: until that path is tuned.
GEMV_LAYER_MAX_M = 1


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when ``F.linear(x, weight)`` should run as the Triton GEMV (``qwen3.kernels.gemv``): CUDA, 16-bit,
    x [M, K] with 1 <= M <= GEMV_LAYER_MAX_M, both contiguous in K, and ``QWEN3_GEMV`` not 0. Safe inside CUDA graph
    capture (it reads only shapes and flags)."""
    return (
        x.is_cuda
        and x.dim() == 2
        and 1 <= x.shape[0] <= GEMV_LAYER_MAX_M
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
        and gemv_enabled()
    )


def qk_norm_rope_supported(head_dim: int) -> bool:
    """The fused q/k-norm + RoPE kernel tiles half a head: head_dim / 2 must be a power of two (Qwen3: 64)."""
    half = head_dim // 2
    return head_dim % 2 == 0 and half > 0 and half & (half - 1) == 0
