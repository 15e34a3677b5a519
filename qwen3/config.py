"""Qwen3 model configuration, read from a Hugging Face checkpoint directory's ``config.json``.

Only what the model layer needs is kept. Fields that change the maths but are not supported here
(sliding windows, other rope types, another architecture) raise a ``ConfigError`` naming the field,
instead of being silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen3.dtypes import DTYPE_NAMES, torch_dtype

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)


class ConfigError(ValueError):
    """A checkpoint configuration this implementation cannot serve; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters, as Hugging Face reads them (``rope_scaling`` / ``rope_parameters``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    torch_dtype: torch.dtype = torch.bfloat16
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                f"'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"config field 'rms_norm_eps' must be positive, got {self.rms_norm_eps}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Qwen3Config:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        eos = _read_eos_ids(Path(model_dir), raw)
        try:
            return cls.from_dict(raw, eos_token_ids=eos)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc  # say which checkpoint, too

    @classmethod
    def from_dict(cls, raw: dict[str, Any], eos_token_ids: tuple[int, ...] = ()) -> Qwen3Config:
        archs = raw.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"config field 'architectures' is {archs!r}; this server supports {list(SUPPORTED_ARCHITECTURES)}"
            )
        if raw.get("use_sliding_window"):
            raise ConfigError("config field 'use_sliding_window' is true; sliding-window attention is not supported")
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if required not in raw:
                raise ConfigError(f"config field '{required}' is missing")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config field 'hidden_act' is {act!r}; only 'silu' is supported")

        # transformers 5 writes rope settings under `rope_parameters`; checkpoints on the Hub use
        # top-level `rope_theta` + `rope_scaling`. Accept both.
        rope_params = dict(raw.get("rope_parameters") or {})
        rope_scaling_raw = raw.get("rope_scaling") or {}
        rope_theta: Any = raw.get("rope_theta", rope_params.get("rope_theta", 1_000_000.0))
        scaling_src = rope_scaling_raw or rope_params
        scaling_key = "rope_scaling" if rope_scaling_raw else "rope_parameters"
        rope_type = scaling_src.get("rope_type", scaling_src.get("type", "default")) if scaling_src else "default"
        rope_scaling: RopeScaling | None = None
        if rope_type == "yarn":
            if "factor" not in scaling_src:
                raise ConfigError(f"config field '{scaling_key}.factor' is missing for YaRN")
            rope_scaling = RopeScaling(
                factor=float(scaling_src["factor"]),
                original_max_position_embeddings=int(
                    scaling_src.get("original_max_position_embeddings", raw.get("max_position_embeddings", 40960))
                ),
                beta_fast=float(scaling_src.get("beta_fast") or 32.0),
                beta_slow=float(scaling_src.get("beta_slow") or 1.0),
                attention_factor=scaling_src.get("attention_factor"),
                mscale=scaling_src.get("mscale"),
                mscale_all_dim=scaling_src.get("mscale_all_dim"),
                truncate=bool(scaling_src.get("truncate", True)),
            )
        elif rope_type != "default":
            raise ConfigError(f"config field '{scaling_key}.rope_type' is {rope_type!r}; supported: default, yarn")

        dtype_name = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        if dtype_name not in DTYPE_NAMES:
            raise ConfigError(f"config field 'torch_dtype' is {dtype_name!r}; supported: {sorted(DTYPE_NAMES)}")

        heads = raw["num_attention_heads"]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 40960),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            torch_dtype=torch_dtype(dtype_name),
            eos_token_ids=eos_token_ids or _as_id_tuple(raw.get("eos_token_id")),
        )


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _read_eos_ids(model_dir: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    """EOS ids: generation_config.json wins (Qwen3 lists both <|im_end|> and <|endoftext|> there)."""
    gen = model_dir / "generation_config.json"
    ids: tuple[int, ...] = ()
    if gen.is_file():
        try:
            ids = _as_id_tuple(json.loads(gen.read_text()).get("eos_token_id"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{gen} is not valid JSON: {exc}") from exc
    return ids or _as_id_tuple(raw.get("eos_token_id"))
