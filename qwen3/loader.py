"""Load a Hugging Face safetensors checkpoint (single file or sharded) into a (tensor-parallel) model.

The generic loop: for each checkpoint tensor, find the parameter it fills (through the model's
``packed_modules_mapping`` for fused projections) and call that parameter's ``weight_loader`` with a
lazy view of the tensor, so each rank reads only its own shard from disk. Every failure names the
tensor and the file.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qwen3.layers.weights import default_weight_loader

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The checkpoint does not fit the model: the message names the tensor and file."""


class _SafetensorsTensor:
    """A ``CheckpointTensor`` over one tensor of an open safetensors file; reads bytes only on demand."""

    def __init__(self, handle, name: str) -> None:
        self._slice = handle.get_slice(name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = tuple([slice(None)] * dim + [slice(start, start + length)])
        return self._slice[index]

    def load(self) -> torch.Tensor:
        return self._slice[:]


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: from ``model.safetensors.index.json`` if present."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"checkpoint file {f.name} listed in {index.name} does not exist")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    return files


def load_checkpoint(model: nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint in ``model_dir``."""
    packed: dict[str, tuple[str, str | int]] = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())
    expected = _expected_loads(params, packed)
    loaded: set[tuple[str, object]] = set()
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    files = checkpoint_files(model_dir)
    started = time.monotonic()
    for number, path in enumerate(files, 1):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError for truncated/corrupt headers
            raise CheckpointError(f"checkpoint file {path.name} is unreadable (truncated or corrupt?): {exc}") from exc
        with handle:
            for name in handle.keys():
                if tied and name == "lm_head.weight":
                    continue  # tied checkpoints may still carry a copy of the embedding
                param_name, shard_id = _target(name, packed)
                if param_name not in params:
                    raise CheckpointError(f"unexpected tensor '{name}' in {path.name}: the model has no such parameter")
                param = params[param_name]
                loader = getattr(param, "weight_loader", None)
                try:
                    source = _SafetensorsTensor(handle, name)
                    if shard_id is None:
                        (loader or default_weight_loader)(param, source)
                    else:
                        loader(param, source, shard_id)
                except CheckpointError:
                    raise
                except Exception as exc:
                    raise CheckpointError(f"tensor '{name}' in {path.name}: {exc}") from exc
                loaded.add((param_name, shard_id))
        log.info("loaded weights file %d/%d (%s) in %.1fs", number, len(files), path.name, time.monotonic() - started)
    missing = sorted(f"{p}" + (f" (part {s!r})" if s is not None else "") for p, s in expected - loaded)
    if missing:
        raise CheckpointError(f"missing tensor(s) in checkpoint {Path(model_dir)}: {', '.join(missing[:8])}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def _target(name: str, packed: dict[str, tuple[str, str | int]]) -> tuple[str, str | int | None]:
    for ckpt_part, (fused, shard_id) in packed.items():
        token = f".{ckpt_part}."
        if token in name:
            return name.replace(token, f".{fused}."), shard_id
    return name, None


def _expected_loads(params: dict[str, nn.Parameter], packed: dict[str, tuple[str, str | int]]) -> set[tuple[str, object]]:
    shards_of: dict[str, list[str | int]] = {}
    for fused, shard_id in packed.values():
        shards_of.setdefault(fused, []).append(shard_id)
    expected: set[tuple[str, object]] = set()
    for name in params:
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        for shard_id in shards_of.get(module, [None]):
            expected.add((name, shard_id))
    return expected
