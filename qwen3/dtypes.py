"""The dtype names the project accepts (configs, CLIs, checkpoints), torch-free at import."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: the names, as config.json's ``torch_dtype`` and the CLIs spell them
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; ValueError naming the choices otherwise."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {name!r}")
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype
