"""Write random-weight Qwen3 checkpoints with Hugging Face ``transformers`` (no weights can be downloaded here).

Presets carry the real Qwen3 shapes (0.6B ... 32B) or scaled-down ones for fast tests. The checkpoint
is written by ``save_pretrained`` as safetensors (optionally sharded), with the real Qwen3 tokenizer
files vendored in ``qwen3/assets`` and a generation config listing Qwen3's EOS ids.
"""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"
QWEN3_VOCAB = 151936  # embedding rows of every Qwen3 checkpoint (the tokenizer uses 151,669 of them)
QWEN3_EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>

# A table: one model a row, not one field a line.
# fmt: off
_REAL = dict(vocab_size=QWEN3_VOCAB, head_dim=128, num_key_value_heads=8, max_position_embeddings=40960,
             rope_theta=1_000_000.0, rms_norm_eps=1e-6)
_REAL_SIZES = {  # name: (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, tie_word_embeddings)
    "qwen3-0.6b": (1024, 3072, 28, 16, True),
    "qwen3-1.7b": (2048, 6144, 28, 16, True),
    "qwen3-4b": (2560, 9728, 36, 32, True),
    "qwen3-8b": (4096, 12288, 36, 32, False),
    "qwen3-14b": (5120, 17408, 40, 40, False),
    "qwen3-32b": (5120, 25600, 64, 64, False),
}
PRESETS: dict[str, dict[str, Any]] = {
    **{
        name: dict(_REAL, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                   num_attention_heads=heads, tie_word_embeddings=tie)
        for name, (hidden, inter, layers, heads, tie) in _REAL_SIZES.items()
    },
    # Scaled-down Qwen3: same structure (GQA, q/k norm, head_dim != hidden / heads), tiny sizes.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                 rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # The demo / service-test model: the full Qwen3 vocabulary so the real tokenizer's ids are valid.
    "demo": dict(vocab_size=QWEN3_VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
}
# fmt: on


def write_tokenizer(out_dir: str | Path) -> None:
    """Put the real Qwen3 tokenizer (``tokenizer.json``, ``tokenizer_config.json``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with lzma.open(ASSETS / "tokenizer.json.xz") as src, open(out_dir / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copyfile(ASSETS / "tokenizer_config.json", out_dir / "tokenizer_config.json")


def write_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    with_tokenizer: bool = True,
    init_std: float | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> Path:
    """Write a random-weight ``Qwen3ForCausalLM`` checkpoint; returns ``out_dir``.

    ``overrides`` replace preset fields (e.g. ``num_key_value_heads=4``, ``rope_scaling={...}``).
    ``max_shard_size`` (e.g. ``"200KB"``) produces a sharded checkpoint with an index file.
    ``init_std`` widens the random init so that logits are far from ties (default: transformers' 0.02).
    ``device`` is where the weights are drawn (the same seed gives different weights on CPU and CUDA).
    """
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3ForCausalLM as HFQwen3ForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    fields = {**PRESETS[preset], **overrides}
    if init_std is not None:
        fields["initializer_range"] = init_std
    # Scaled-down vocabularies cannot hold Qwen3's special ids: their last id stands in for EOS.
    eos_ids = QWEN3_EOS_IDS if fields["vocab_size"] > max(QWEN3_EOS_IDS) else [fields["vocab_size"] - 1]
    config = HFQwen3Config(**fields, eos_token_id=eos_ids[-1], bos_token_id=eos_ids[-1])
    torch.manual_seed(seed)
    with torch.device(device):
        model = HFQwen3ForCausalLM(config).to(dtype)  # type: ignore[arg-type]  # transformers types .to() wrongly
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    (out_dir / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": eos_ids[-1],
                "eos_token_id": eos_ids,
                "do_sample": True,
                "temperature": 0.6,
                "top_k": 20,
                "top_p": 0.95,
            },
            indent=2,
        )
    )
    if with_tokenizer:
        write_tokenizer(out_dir)
    return out_dir
