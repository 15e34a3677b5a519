"""The safetensors loader: single-file and sharded checkpoints load the same weights, dtypes are
converted, and every way a checkpoint can fail to fit the model is an error naming tensor and file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import load_model
from safetensors.torch import load_file, save_file

from qwen3 import CheckpointError, ConfigError

# Untied, with attention biases: every kind of parameter (fused q/k/v and gate/up, biases, lm_head).
SHAPE = dict(tie_word_embeddings=False, attention_bias=True)
LAYER0 = "model.layers.0"


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwen3.testing import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("single"), "tiny", seed=3, with_tokenizer=False, **SHAPE)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwen3.testing import write_checkpoint

    return write_checkpoint(
        tmp_path_factory.mktemp("sharded"), "tiny", seed=3, with_tokenizer=False, max_shard_size="100KB", **SHAPE
    )


def edited_copy(src: Path, dst: Path, file: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of checkpoint ``src`` whose safetensors ``file`` is rewritten after ``edit`` changed its tensors."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / file)
    edit(tensors)
    save_file(tensors, dst / file, metadata={"format": "pt"})
    return dst


def file_holding(checkpoint: Path, tensor: str) -> str:
    return json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def all_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_holds_checkpoint(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Every parameter equals (exactly) the checkpoint tensors it was filled from, upcast to fp32."""
    params = dict(model.named_parameters())
    attn, mlp = f"{LAYER0}.self_attn", f"{LAYER0}.mlp"
    fused = {
        f"{attn}.qkv_proj.weight": [f"{attn}.{p}_proj.weight" for p in "qkv"],
        f"{attn}.qkv_proj.bias": [f"{attn}.{p}_proj.bias" for p in "qkv"],
        f"{mlp}.gate_up_proj.weight": [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"],
    }
    for name, parts in fused.items():
        assert torch.equal(params[name], torch.cat([tensors[p].float() for p in parts])), name
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        f"{attn}.o_proj.weight",
        f"{attn}.o_proj.bias",
        f"{attn}.q_norm.weight",
        f"{mlp}.down_proj.weight",
        f"{LAYER0}.input_layernorm.weight",
    ):
        assert params[name].dtype == torch.float32
        assert torch.equal(params[name], tensors[name].float()), name


def test_single_file_and_sharded_load_identically(single: Path, sharded: Path) -> None:
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    one, many = load_model(single, num_blocks=1), load_model(sharded, num_blocks=1)
    assert_holds_checkpoint(one, all_tensors(single))
    many_params = dict(many.named_parameters())
    for name, param in one.named_parameters():
        assert torch.equal(param, many_params[name]), name


def test_bf16_checkpoint_loads_as_upcast_weights(tmp_path: Path) -> None:
    from qwen3.testing import write_checkpoint

    path = write_checkpoint(tmp_path, "tiny", dtype=torch.bfloat16, seed=3, with_tokenizer=False, **SHAPE)
    tensors = all_tensors(path)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert_holds_checkpoint(load_model(path, num_blocks=1), tensors)


def test_tied_checkpoint_with_a_copy_of_the_embedding_loads(tmp_path: Path) -> None:
    from qwen3.testing import write_checkpoint

    src = write_checkpoint(tmp_path / "src", "tiny", seed=3, with_tokenizer=False)
    path = edited_copy(
        src,
        tmp_path / "copy",
        "model.safetensors",
        lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone() + 1),
    )
    model = load_model(path, num_blocks=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the copy is ignored, the tie kept


def test_missing_tensor(single: Path, tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"  # one part of a fused parameter
    path = edited_copy(single, tmp_path / "ckpt", "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"'{name}'.*model\.safetensors"):
        load_model(path)


def test_missing_tensor_in_a_shard(sharded: Path, tmp_path: Path) -> None:
    name = "lm_head.weight"
    shard = file_holding(sharded, name)
    path = edited_copy(sharded, tmp_path / "ckpt", shard, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"'{name}'.*{shard}"):
        load_model(path)


def test_unexpected_tensor(single: Path, tmp_path: Path) -> None:
    name = f"{LAYER0}.mlp.extra_proj.weight"
    path = edited_copy(single, tmp_path / "ckpt", "model.safetensors", lambda t: t.__setitem__(name, torch.ones(2)))
    with pytest.raises(CheckpointError, match=rf"'{name}' in model\.safetensors"):
        load_model(path)


@pytest.mark.parametrize(
    "name", [f"{LAYER0}.mlp.down_proj.weight", f"{LAYER0}.self_attn.v_proj.bias", "model.embed_tokens.weight"]
)
def test_misshaped_tensor(single: Path, tmp_path: Path, name: str) -> None:
    def reshape(tensors: dict[str, torch.Tensor]) -> None:
        t = tensors[name]
        tensors[name] = t.t().contiguous() if t.dim() == 2 else torch.cat([t, t])

    path = edited_copy(single, tmp_path / "ckpt", "model.safetensors", reshape)
    with pytest.raises(CheckpointError, match=rf"'{name}' in model\.safetensors: shape mismatch"):
        load_model(path)


def test_truncated_file(sharded: Path, tmp_path: Path) -> None:
    path = shutil.copytree(sharded, tmp_path / "ckpt")
    shard = path / file_holding(sharded, f"{LAYER0}.mlp.down_proj.weight")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is unreadable"):
        load_model(path)


def test_wrong_architecture(single: Path, tmp_path: Path) -> None:
    path = shutil.copytree(single, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"config\.json.*'architectures'.*LlamaForCausalLM"):
        load_model(path)


def test_index_lists_a_file_that_does_not_exist(sharded: Path, tmp_path: Path) -> None:
    path = shutil.copytree(sharded, tmp_path / "ckpt")
    shard = file_holding(sharded, "lm_head.weight")
    (path / shard).unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"{shard} listed in model\.safetensors\.index\.json does not exist"
        r".*'lm_head\.weight'",
    ):
        load_model(path)
