"""Our Qwen3 against Hugging Face ``transformers`` on the same random checkpoint, in fp32.

Every comparison is per element over the whole vocabulary and every token position:
max |ours - HF| <= 1e-4 * max |HF|. Each prompt is compared with HF running it alone, so packing
several prompts into one batch, paging the KV cache through random blocks, decoding token by token
and chunking a prefill must all be invisible in the logits.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from helpers import BlockPool, assert_logits_close, hf_logits, load_model, prefill, random_prompts, run_step

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}

# preset "tiny": hidden 64, 4 heads, 2 KV heads, head_dim 32 (!= 64 / 4), tied embeddings, 2 layers.
VARIANTS: dict[str, dict] = {
    "tied-gqa2-headdim32": {},
    "untied-gqa1-bias": dict(tie_word_embeddings=False, num_key_value_heads=4, attention_bias=True),
    "gqa4-headdim16": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16),  # 64 / 8 = 8
    "yarn": dict(tie_word_embeddings=False, rope_scaling=YARN, max_position_embeddings=1024),
}
# Lengths chosen to straddle 16-token blocks; YaRN prompts run past the 256 pre-scaling positions.
PROMPT_LENGTHS = {"yarn": [300, 5, 270]}
DEFAULT_LENGTHS = [1, 7, 33, 20]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    from qwen3.testing import write_checkpoint

    name = request.param
    path = write_checkpoint(
        tmp_path_factory.mktemp(name), "tiny", init_std=0.5, with_tokenizer=False, seed=1, **VARIANTS[name]
    )
    return name, path


def test_prefill_matches_hf(variant: tuple[str, Path]) -> None:
    name, path = variant
    model = load_model(path, block_size=16, num_blocks=64)
    prompts = random_prompts(PROMPT_LENGTHS.get(name, DEFAULT_LENGTHS), model.config.vocab_size, seed=2)
    logits, _ = prefill(model, prompts, BlockPool(64, seed=3))  # all prompts packed into one batch
    for i, (prompt, ours) in enumerate(zip(prompts, logits)):
        assert_logits_close(ours, hf_logits(path, prompt), f"{name} prompt {i} (len {len(prompt)})")


def test_yarn_scaling_is_exercised(tmp_path: Path) -> None:
    """The YaRN comparison above could fail: without the scaling our logits are far from HF's."""
    from qwen3.testing import write_checkpoint

    path = write_checkpoint(tmp_path, "tiny", init_std=0.5, with_tokenizer=False, seed=1, **VARIANTS["yarn"])
    scaled = load_model(path)
    assert scaled.config.rope_scaling is not None and scaled.config.rope_scaling.factor == 4.0
    unscaled = load_model(path, config=dataclasses.replace(scaled.config, rope_scaling=None))
    prompt = random_prompts([300], scaled.config.vocab_size, seed=2)
    ours, _ = prefill(unscaled, prompt, BlockPool(64))
    ref = hf_logits(path, prompt[0])
    assert (ours[0] - ref).abs().max() > 1e-2 * ref.abs().max()


@pytest.mark.parametrize("block_size, prompt_lengths", [(16, [3, 14, 31, 47]), (256, [230, 250, 5])])
def test_paged_decode_matches_hf(tiny_checkpoint: Path, block_size: int, prompt_lengths: list[int]) -> None:
    """Several sequences decode together for 40 steps, each crossing at least one block boundary
    (except the short one at block size 256), through block tables drawn from a shuffled pool."""
    steps = 40
    num_blocks = 4096 // block_size
    model = load_model(tiny_checkpoint, block_size=block_size, num_blocks=num_blocks)
    prompts = random_prompts(prompt_lengths, model.config.vocab_size, seed=4)
    prefill_logits, tables = prefill(model, prompts, BlockPool(num_blocks, seed=5), extra_tokens=steps)
    assert any(b - a != 1 for t in tables for a, b in itertools.pairwise(t)), "block tables should be non-contiguous"

    generated: list[list[int]] = [[int(l[-1].argmax())] for l in prefill_logits]
    decode_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for step in range(steps):
        context = [len(p) + step for p in prompts]
        rows = run_step(model, [[g[-1]] for g in generated], context, tables)
        for i, row in enumerate(rows):
            decode_logits[i].append(row[0])
            generated[i].append(int(row[0].argmax()))

    crossed = 0
    for i, prompt in enumerate(prompts):
        full = prompt + generated[i][:steps]  # the last generated token was never fed back
        ref = hf_logits(tiny_checkpoint, full)
        assert_logits_close(prefill_logits[i], ref[: len(prompt)], f"prefill of seq {i}")
        assert_logits_close(torch.stack(decode_logits[i]), ref[len(prompt) :], f"decode of seq {i}")
        crossed += (len(prompt) - 1) // block_size != (len(full) - 1) // block_size
    assert crossed >= 2, "at least two sequences should cross a block boundary while decoding"


def test_chunked_prefill_equals_one_shot(tiny_checkpoint: Path) -> None:
    """A 70-token prompt fed in chunks of 25, 30 and 15, sharing its batches with another sequence's
    prefill and then decode steps, gives the logits of a one-shot prefill (and of HF)."""
    model = load_model(tiny_checkpoint, block_size=16, num_blocks=64)
    chunked, other = random_prompts([70, 9], model.config.vocab_size, seed=6)
    pool = BlockPool(64, seed=7)
    table_a, table_b = pool.take(5), pool.take(1)

    a1, b_prefill = run_step(model, [chunked[:25], other], [0, 0], [table_a, table_b], all_logits=True)
    a2, b_dec1 = run_step(model, [chunked[25:55], [3]], [25, 9], [table_a, table_b], all_logits=True)
    a3, b_dec2 = run_step(model, [chunked[55:], [4]], [55, 10], [table_a, table_b], all_logits=True)
    chunked_logits = torch.cat([a1, a2, a3])

    (one_shot,), _ = prefill(model, [chunked], pool)
    assert_logits_close(chunked_logits, one_shot, "chunked vs one-shot prefill")
    assert_logits_close(chunked_logits, hf_logits(tiny_checkpoint, chunked), "chunked prefill vs HF")
    assert_logits_close(
        torch.cat([b_prefill, b_dec1, b_dec2]),
        hf_logits(tiny_checkpoint, [*other, 3, 4]),
        "sequence sharing the chunked batches",
    )
