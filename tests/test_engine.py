"""Engine core on CPU (fp32): greedy parity with transformers, prefix caching, preemption, chunked
prefill, seeded sampling, aborts, validation, and tensor parallelism over gloo."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine_service import LLM, SamplingParams
from engine_service.config import EngineConfig
from engine_service.core.engine import LLMEngine


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(tiny_checkpoint, device="cpu", num_kv_blocks=256, kv_block_size=16)


def greedy(llm: LLM, ps: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(ps, params)]


def test_greedy_matches_transformers_generate(llm: LLM, tiny_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ps = prompts(16, seed=1)
    ours = greedy(llm, ps)
    for p, got in zip(ps, ours):
        ids = torch.tensor([p])
        # attention_mask given explicitly: otherwise transformers masks every token equal to pad_token_id
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        assert got == ref


def test_block_pool_is_whole_after_every_request(llm: LLM) -> None:
    greedy(llm, prompts(8, seed=2))
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_cache_computes_only_new_tokens(tiny_checkpoint: Path) -> None:
    base = prompts(1, seed=3, lo=50, hi=50)[0]
    second = [*base[:48], 7, 8, 9, 10, 11]
    with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, kv_block_size=16) as cached:
        cached.generate([base], GREEDY)
        before = cached.engine.num_prompt_tokens_total
        out = cached.generate([second], GREEDY)[0]
        assert cached.engine.num_prompt_tokens_total - before == len(second) - 48
        assert out.num_cached_tokens == 48
    with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, kv_block_size=16, enable_prefix_caching=False) as plain:
        plain.generate([base], GREEDY)
        ref = plain.generate([second], GREEDY)[0]
        assert ref.num_cached_tokens == 0
    assert out.token_ids == ref.token_ids


def test_preemption_completes_everything_identically(llm: LLM, tiny_checkpoint: Path) -> None:
    ps = prompts(10, seed=4, lo=20, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = greedy(llm, ps, params)
    # 12 blocks of 16 tokens cannot hold 10 sequences of ~60 tokens: the scheduler must preempt.
    with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=12, kv_block_size=16, max_num_batched_tokens=256) as small:
        got = greedy(small, ps, params)
        assert small.engine.scheduler.num_preemptions_total > 0
        assert small.engine.block_manager.num_free_blocks == 12
    assert got == expected


def test_chunked_prefill_matches_unchunked(llm: LLM, tiny_checkpoint: Path) -> None:
    ps = prompts(6, seed=5, lo=40, hi=90)
    expected = greedy(llm, ps)
    with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=256, max_num_batched_tokens=24, max_num_seqs=4) as chunked:
        assert greedy(chunked, ps) == expected


def test_seeded_sampling_is_independent_of_batch_composition(llm: LLM) -> None:
    target = prompts(1, seed=6)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([target], params)[0].token_ids
    others = prompts(5, seed=7)
    mixed = llm.generate(
        [*others[:2], target, *others[2:]],
        [SamplingParams(temperature=0.7, max_tokens=9, ignore_eos=True)] * 2
        + [params]
        + [SamplingParams(temperature=1.3, max_tokens=20, ignore_eos=True)] * 3,
    )
    assert mixed[2].token_ids == alone
    other_seed = llm.generate(
        [target], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    )[0].token_ids
    assert other_seed != alone


def test_stop_tokens_and_max_tokens(llm: LLM) -> None:
    p = prompts(1, seed=8)[0]
    free_run = llm.generate([p], GREEDY)[0].token_ids
    stop_at = free_run[4]
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free_run[: free_run.index(stop_at) + 1]
    assert llm.generate([p], GREEDY)[0].finish_reason == "length"


def test_abort_returns_blocks_at_once(tiny_checkpoint: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), device="cpu", num_kv_blocks=32))
    for i, p in enumerate(prompts(3, seed=9, lo=30, hi=40)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < 32
    for i in range(3):
        [final] = engine.abort_request(f"r{i}")
        assert final.finish_reason.value == "aborted"
    assert engine.block_manager.num_free_blocks == 32
    assert engine.abort_request("r0") == []
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], SamplingParams(), "prompt_token_ids"),
        ([1, 2, 100_000], SamplingParams(), "prompt_token_ids"),
        ([1] * 5000, SamplingParams(), "prompt_token_ids"),
        ([1, 2], SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ],
)
def test_invalid_requests_name_the_field(llm: LLM, prompt, params, field) -> None:
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt], params)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("tensor_parallel_size", 0),
        ("dtype", "int8"),
        ("kv_block_size", 12),
        ("max_num_seqs", 0),
        ("gpu_memory_utilization", 1.5),
        ("attention_backend", "magic"),
        ("max_model_len", 10**9),
    ],
)
def test_invalid_engine_options_name_the_field(tiny_checkpoint: Path, option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        LLM(tiny_checkpoint, device="cpu", **{option: value})


def test_tensor_parallel_2_matches_tp_1(llm: LLM, tiny_checkpoint: Path) -> None:
    ps = prompts(6, seed=10)
    expected = greedy(llm, ps)
    with LLM(tiny_checkpoint, device="cpu", tensor_parallel_size=2, num_kv_blocks=128) as tp2:
        assert greedy(tp2, ps) == expected
