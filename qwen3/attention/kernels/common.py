"""Argument checks shared by the kernel launchers: each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import torch

#: element types the attention kernels accept for q and the KV cache
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate the paged caches [num_blocks, block_size, Hkv, D]; returns their shape.

    The kernels address both caches with one set of strides, so K and V must share shape and strides;
    the head dim must be contiguous (views of one KV pool, as the model runner makes, qualify).
    """
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, Hkv, D], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(
            f"v_cache must match k_cache in shape and strides: {tuple(v_cache.shape)}/{v_cache.stride()} "
            f"vs {tuple(k_cache.shape)}/{k_cache.stride()}"
        )
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}")
    if k_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache must be contiguous in the head dimension (stride(-1) == 1)")
    if v_cache.device != k_cache.device:
        raise ValueError(f"v_cache is on {v_cache.device}, k_cache on {k_cache.device}")
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    return num_blocks, block_size, num_kv_heads, head_dim


def check_attention_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate q [T, Hq, D] against the caches; returns (block_size, Hkv, D, group = Hq / Hkv)."""
    _, block_size, num_kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    if k_cache.dtype not in ATTENTION_DTYPES:
        raise ValueError(f"k_cache dtype must be one of {ATTENTION_DTYPES}, got {k_cache.dtype}")
    check_tokens("q", q, None, head_dim, k_cache.dtype, k_cache.device)
    if q.shape[1] % num_kv_heads != 0:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of the cache's {num_kv_heads} KV heads")
    return block_size, num_kv_heads, head_dim, q.shape[1] // num_kv_heads


def cuda_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why a CUDA-only attention backend cannot run on ``device``, or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the {backend} attention backend needs a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        return f"the {backend} attention backend needs CUDA, and torch.cuda.is_available() is False"
    return None


def check_tokens(
    name: str, x: torch.Tensor, num_heads: int | None, head_dim: int, dtype: torch.dtype, device: torch.device
) -> None:
    """``x`` is [T, H, D] with a contiguous head dim, the given dtype and device (H checked if given)."""
    if x.dim() != 3 or x.shape[2] != head_dim or (num_heads is not None and x.shape[1] != num_heads):
        heads = "H" if num_heads is None else str(num_heads)
        raise ValueError(f"{name} must be [T, {heads}, {head_dim}], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride(-1) == 1), got strides {x.stride()}")
    if x.dtype != dtype:
        raise ValueError(f"{name} has dtype {x.dtype}; expected {dtype} (the KV cache's dtype)")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the KV cache on {device}")


def check_index(
    name: str, x: torch.Tensor, dtype: torch.dtype, shape: tuple[int | None, ...], device: torch.device
) -> None:
    """``x`` is an integer tensor of ``dtype`` and ``shape`` (None = any size), contiguous in its last dim."""
    if x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {x.dtype}")
    if x.dim() != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        want_text = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{want_text}], got {tuple(x.shape)}")
    if x.dim() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the KV cache on {device}")


def launch_strides(
    q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor
) -> tuple[int, ...]:
    """The strides both attention kernels take, in their parameter order: q's and out's (token, head), the
    cache's (block, slot, head; V shares them, see :func:`check_kv_cache`) and a block-table row's."""
    return (q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], block_tables.stride(0))


def kv_store_strides(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None) -> tuple[int, ...]:
    """The strides both KV-store kernels take, as one tuple argument: k's and v's (token, head) and the cache's
    (block, slot, head; V shares them, see :func:`check_kv_cache`), zeros for a kernel launched with no cache."""
    cache_strides = k_cache.stride()[:3] if k_cache is not None else (0, 0, 0)
    return (k.stride(0), k.stride(1), v.stride(0), v.stride(1), *cache_strides)


def output_like(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """A fresh contiguous tensor like ``q``, or ``out`` after checking it can take q's result."""
    if out is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last dimension (stride(-1) == 1)")
    return out
