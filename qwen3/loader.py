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
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from qwen3.layers.weights import default_weight_loader

log = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint does not fit the model: the message names the tensor and file."""


class _SafetensorsTensor:
    """A ``CheckpointTensor`` over one tensor of an open safetensors file; reads bytes only on demand."""

    def __init__(self, handle: Any, name: str) -> None:  # handle: an open safetensors file (untyped API)
        self._slice = handle.get_slice(name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = tuple([slice(None)] * dim + [slice(start, start + length)])
        part: torch.Tensor = self._slice[index]
        return part

    def load(self) -> torch.Tensor:
        whole: torch.Tensor = self._slice[:]
        return whole


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: from ``model.safetensors.index.json`` if present."""
    model_dir = Path(model_dir)
    weight_map = _index_weight_map(model_dir)
    if weight_map is not None:
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                held = sorted(t for t, name in weight_map.items() if name == f.name)
                raise CheckpointError(
                    f"checkpoint file {f.name} listed in {_INDEX} does not exist (it should hold {_name_list(held)})"
                )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    return files


def _index_weight_map(model_dir: Path) -> dict[str, str] | None:
    """tensor name -> file name from a sharded checkpoint's index, or None for a single-file checkpoint."""
    index = model_dir / _INDEX
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} is not a valid safetensors index: 'weight_map' is not an object")
    return weight_map


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
            handle: Any = safe_open(str(path), framework="pt", device="cpu")  # its methods are untyped
        except Exception as exc:  # safetensors raises its own SafetensorError for truncated/corrupt headers
            raise CheckpointError(f"checkpoint file {path.name} is unreadable (truncated or corrupt?): {exc}") from exc
        with handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open's handle is not iterable)
                if tied and name == "lm_head.weight":
                    continue  # tied checkpoints may still carry a copy of the embedding
                param_name, shard_id = _target(name, packed)
                if param_name not in params and f"model.{param_name}" in params:
                    param_name = f"model.{param_name}"  # a bare Qwen3Model checkpoint (Qwen3-Embedding's layout)
                if param_name not in params:
                    raise CheckpointError(f"unexpected tensor '{name}' in {path.name}: the model has no such parameter")
                param = params[param_name]
                loader = getattr(param, "weight_loader", None)
                try:
                    source = _SafetensorsTensor(handle, name)
                    if shard_id is None:
                        (loader or default_weight_loader)(param, source)
                    elif loader is None:
                        raise CheckpointError(
                            f"tensor '{name}' in {path.name}: parameter '{param_name}' is fused "
                            f"but has no weight_loader to place shard {shard_id!r}"
                        )
                    else:
                        loader(param, source, shard_id)
                except CheckpointError:
                    raise
                except Exception as exc:
                    raise CheckpointError(f"tensor '{name}' in {path.name}: {exc}") from exc
                loaded.add((param_name, shard_id))
        log.info("loaded weights file %d/%d (%s) in %.1fs", number, len(files), path.name, time.monotonic() - started)
    missing = sorted(_checkpoint_name(p, s, packed) for p, s in expected - loaded)
    if missing:
        weight_map = _index_weight_map(Path(model_dir)) or {}
        searched = ", ".join(p.name for p in files) if len(files) <= 3 else f"any of the {len(files)} files"
        hints = [f"the index puts '{name}' in {weight_map[name]}" for name in missing[:8] if name in weight_map]
        raise CheckpointError(
            f"missing tensor(s) {_name_list(missing)}: not found in {searched} of {Path(model_dir)}"
            + (f" ({'; '.join(hints)})" if hints else "")
        )


def _target(name: str, packed: dict[str, tuple[str, str | int]]) -> tuple[str, str | int | None]:
    for ckpt_part, (fused, shard_id) in packed.items():
        token = f".{ckpt_part}."
        if token in name:
            return name.replace(token, f".{fused}."), shard_id
    return name, None


def _checkpoint_name(param_name: str, shard_id: object, packed: dict[str, tuple[str, str | int]]) -> str:
    """The checkpoint tensor that fills ``shard_id`` of parameter ``param_name`` (inverse of ``_target``)."""
    for ckpt_part, (fused, fused_shard) in packed.items():
        token = f".{fused}."
        if shard_id is not None and fused_shard == shard_id and token in param_name:
            return param_name.replace(token, f".{ckpt_part}.")
    return param_name


def _name_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _expected_loads(
    params: dict[str, nn.Parameter], packed: dict[str, tuple[str, str | int]]
) -> set[tuple[str, object]]:
    shards_of: dict[str, list[str | int]] = {}
    for fused, packed_shard in packed.values():
        shards_of.setdefault(fused, []).append(packed_shard)
    expected: set[tuple[str, object]] = set()
    for name in params:
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        for shard_id in shards_of.get(module, [None]):
            expected.add((name, shard_id))
    return expected
