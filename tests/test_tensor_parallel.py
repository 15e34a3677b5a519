"""Tensor parallelism on CPU: TP=2 and TP=4 gloo groups of spawned processes give TP=1's logits.

The config shards every dimension by 4 except the vocabulary (510 rows: 128 per rank, the last rank
holding 126 plus 2 padding rows), so the padded vocab shard of the embedding and LM head is exercised.
One spawn per group size does everything that needs the group, including the errors for head counts
and MLP sizes the group does not divide (built in a real TP=4 group, not a faked world size).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import BlockPool, assert_logits_close, hf_logits, load_model, prefill, random_prompts, run_step

TP_SHAPES = dict(
    vocab_size=510,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    max_position_embeddings=512,
)
VARIANTS = {"tied": dict(tie_word_embeddings=True), "untied-bias": dict(tie_word_embeddings=False, attention_bias=True)}
PROMPT_LENGTHS = [5, 23, 40]
DECODE_STEPS = 3


def run_workload(model_dir: Path) -> list[torch.Tensor]:
    """Prefill three prompts together (logits at every position), then decode a few steps together:
    per sequence, its logits [prompt + steps, vocab]. Deterministic, so every rank runs the same."""
    model = load_model(model_dir, block_size=16, num_blocks=32)
    prompts = random_prompts(PROMPT_LENGTHS, model.config.vocab_size, seed=11)
    logits, tables = prefill(model, prompts, BlockPool(32, seed=12), extra_tokens=DECODE_STEPS)
    for step in range(DECODE_STEPS):
        tokens = [[decode_tokens(i)[step]] for i in range(len(prompts))]
        rows = run_step(model, tokens, [len(p) + step for p in prompts], tables)
        logits = [torch.cat([l, r]) for l, r in zip(logits, rows)]
    return logits


def decode_tokens(i: int) -> list[int]:
    """The tokens sequence ``i`` is fed while decoding (fixed, so HF can replay them)."""
    return [(7 * step + 3 * i) % TP_SHAPES["vocab_size"] for step in range(DECODE_STEPS)]


def _worker(rank: int, world: int, init_method: str, model_dirs: dict[str, str], out_dir: str) -> None:
    from qwen3 import Qwen3Config, Qwen3ForCausalLM
    from qwen3.attention.torch_backend import TorchAttentionBackend
    from qwen3.distributed import init_tensor_parallel, tp_world_size

    torch.set_num_threads(1)
    init_tensor_parallel(rank, world, init_method, torch.device("cpu"))
    try:
        assert tp_world_size() == world
        results: dict[str, object] = {name: run_workload(Path(d)) for name, d in model_dirs.items()}
        # Sizes the group does not divide (over 4 ranks, not over 2) must be refused by field name.
        config = Qwen3Config.from_pretrained(model_dirs["tied"])
        for field, value in (("num_key_value_heads", 2), ("intermediate_size", 130)):
            try:
                Qwen3ForCausalLM(dataclasses.replace(config, **{field: value}), TorchAttentionBackend())
                results[f"error:{field}"] = None
            except ValueError as exc:
                results[f"error:{field}"] = str(exc)
        if rank == 0:
            torch.save(results, Path(out_dir) / f"tp{world}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tp_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from qwen3.testing import write_checkpoint

    return {
        name: str(
            write_checkpoint(
                tmp_path_factory.mktemp(f"tp-{name}"),
                "tiny",
                init_std=0.5,
                with_tokenizer=False,
                seed=5,
                **TP_SHAPES,
                **overrides,
            )
        )
        for name, overrides in VARIANTS.items()
    }


@pytest.fixture(scope="module")
def tp1_logits(tp_checkpoints: dict[str, str]) -> dict[str, list[torch.Tensor]]:
    return {name: run_workload(Path(d)) for name, d in tp_checkpoints.items()}


def test_tp1_matches_hf(tp_checkpoints: dict[str, str], tp1_logits: dict[str, list[torch.Tensor]]) -> None:
    """The single-process baseline of this config (vocab 510) is itself right."""
    for name, d in tp_checkpoints.items():
        prompts = random_prompts(PROMPT_LENGTHS, TP_SHAPES["vocab_size"], seed=11)
        for i, (prompt, ours) in enumerate(zip(prompts, tp1_logits[name])):
            assert_logits_close(ours, hf_logits(d, prompt + decode_tokens(i)), f"{name} TP=1 seq {i}")


@pytest.mark.parametrize("world", [2, 4])
def test_tp_matches_tp1(
    world: int, tp_checkpoints: dict[str, str], tp1_logits: dict[str, list[torch.Tensor]], tmp_path: Path
) -> None:
    init_method = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init_method, tp_checkpoints, str(tmp_path)), nprocs=world, join=True)
    results = torch.load(tmp_path / f"tp{world}.pt")
    for name in VARIANTS:
        for i, (sharded, single) in enumerate(zip(results[name], tp1_logits[name])):
            assert_logits_close(sharded, single, f"{name} TP={world} seq {i}")
    for field, value in (("num_key_value_heads", 2), ("intermediate_size", 130)):
        error = results[f"error:{field}"]
        if world == 4:
            assert error is not None and f"'{field}' ({value})" in error, error
        else:
            assert error is None, error  # both divide by 2
