"""Reading ``config.json`` / ``generation_config.json``: what parses, and what is refused by field name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen3 import ConfigError, Qwen3Config
from qwen3.config import RopeScaling

# Qwen3-0.6B's config.json as published on the Hub (written by transformers 4.51).
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_GENERATION = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}


def write_config(tmp_path: Path, config: dict, generation: dict | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_hub_config_parses(tmp_path: Path) -> None:
    config = Qwen3Config.from_pretrained(write_config(tmp_path, QWEN3_0_6B, QWEN3_GENERATION))
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        151936,
        1024,
        3072,
        28,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (16, 8, 128)
    assert config.q_size == 2048 and config.kv_size == 1024  # head_dim * heads != hidden_size
    assert config.rope_theta == 1e6 and config.rope_scaling is None
    assert config.tie_word_embeddings and not config.attention_bias
    assert config.torch_dtype == torch.bfloat16 and config.rms_norm_eps == 1e-6


def test_eos_ids_come_from_generation_config(tmp_path: Path) -> None:
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    with_gen = Qwen3Config.from_pretrained(write_config(tmp_path / "with", QWEN3_0_6B, QWEN3_GENERATION))
    assert with_gen.eos_token_ids == (151645, 151643)  # <|im_end|> and <|endoftext|>, not just config.json's
    without_gen = Qwen3Config.from_pretrained(write_config(tmp_path / "without", QWEN3_0_6B))
    assert without_gen.eos_token_ids == (151645,)


YARN = {"factor": 4.0, "original_max_position_embeddings": 32768}


@pytest.mark.parametrize(
    "rope_fields",
    [
        pytest.param({"rope_theta": 1e6, "rope_scaling": {"rope_type": "yarn", **YARN}}, id="hub-rope_scaling"),
        pytest.param({"rope_theta": 1e6, "rope_scaling": {"type": "yarn", **YARN}}, id="hub-legacy-type-key"),
        pytest.param({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, **YARN}}, id="transformers5"),
    ],
)
def test_rope_settings_parse_in_both_styles(rope_fields: dict) -> None:
    raw = {k: v for k, v in QWEN3_0_6B.items() if k not in ("rope_theta", "rope_scaling")}
    config = Qwen3Config.from_dict({**raw, **rope_fields})
    assert config.rope_theta == 1e6
    assert config.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=32768)


def test_default_rope_in_transformers5_style() -> None:
    raw = {k: v for k, v in QWEN3_0_6B.items() if k not in ("rope_theta", "rope_scaling")}
    config = Qwen3Config.from_dict({**raw, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert config.rope_theta == 5e5 and config.rope_scaling is None


def test_inactive_sliding_window_field_is_accepted() -> None:
    config = Qwen3Config.from_dict({**QWEN3_0_6B, "sliding_window": 32768, "use_sliding_window": False})
    assert config.hidden_size == 1024


@pytest.mark.parametrize(
    "change, field",
    [
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
        (
            {"rope_scaling": None, "rope_parameters": {"rope_type": "linear", "factor": 2.0}},
            "rope_parameters.rope_type",
        ),
        ({"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling.factor"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"num_key_value_heads": 5}, "num_attention_heads"),
        ({"head_dim": 127}, "head_dim"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"torch_dtype": "float64"}, "torch_dtype"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_unsupported_or_invalid_fields_are_refused_by_name(change: dict, field: str) -> None:
    raw = {k: v for k, v in {**QWEN3_0_6B, **change}.items() if not (k == "vocab_size" and v is None)}  # None: drop
    with pytest.raises(ConfigError, match=f"'{field}'"):
        Qwen3Config.from_dict(raw)


def test_config_errors_name_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, {**QWEN3_0_6B, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match=r"config\.json.*'hidden_act'"):
        Qwen3Config.from_pretrained(path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json"):
        Qwen3Config.from_pretrained(path)
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen3Config.from_pretrained(tmp_path / "nowhere")
