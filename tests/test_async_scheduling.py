"""Async scheduling (one step in flight, sampled ids fed to the next step on the device) must not
change a single token: each case runs the same requests with and without it on CPU (fp32)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from engine_service import LLM, SamplingParams
from engine_service.config import EngineConfig
from engine_service.core.engine import LLMEngine


def prompts(n: int, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run(checkpoint: Path, ps: list[list[int]], params, *, overlap: bool, **options):
    with LLM(checkpoint, device="cpu", async_scheduling=overlap, **options) as llm:
        outs = llm.generate(ps, params)
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks, "a KV block leaked"
        return outs, llm.engine


def same(checkpoint: Path, ps, params, **options):
    """Run with and without overlap; assert identical outputs; return the overlapped run's outputs."""
    ref, _ = run(checkpoint, ps, params, overlap=False, **options)
    got, engine = run(checkpoint, ps, params, overlap=True, **options)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in ref]
    return got, ref, engine


def test_default_is_off_on_cpu(tiny_checkpoint: Path) -> None:
    assert not EngineConfig(model=str(tiny_checkpoint), device="cpu").overlaps_steps
    assert EngineConfig(model=str(tiny_checkpoint), device="cpu", async_scheduling=True).overlaps_steps


def test_greedy_mixed_lengths(tiny_checkpoint: Path) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (1, 2, 5, 17, 9, 30)]
    got, _, _ = same(tiny_checkpoint, prompts(6, seed=1), params, num_kv_blocks=64)
    assert [len(o.token_ids) for o in got] == [1, 2, 5, 17, 9, 30]


def test_seeded_sampling_warpers_and_logprobs(tiny_checkpoint: Path) -> None:
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.8, top_k=20, min_p=0.05, seed=8, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=1.2, seed=9, max_tokens=25, ignore_eos=True, min_tokens=25, logprobs=0),
    ]
    got, ref, _ = same(tiny_checkpoint, prompts(3, seed=2), params, num_kv_blocks=64)
    # Same tokens; logprobs equal up to fp32 rounding (a finished row stays one extra step, so some
    # steps have a different batch shape and their matmuls may round differently).
    for g, r in zip(got, ref):
        assert [t.token_id for t in g.logprobs or []] == [t.token_id for t in r.logprobs or []]
        assert [t.logprob for t in g.logprobs or []] == pytest.approx([t.logprob for t in r.logprobs or []], abs=1e-4)
        assert [[i for i, _ in t.top] for t in g.logprobs or []] == [[i for i, _ in t.top] for t in r.logprobs or []]
    assert got[0].logprobs and len(got[0].logprobs[0].top) == 3


def test_penalties_read_the_token_in_flight(tiny_checkpoint: Path) -> None:
    """Penalties count the previous step's token while it is still on the device; mixed with other
    requests every token matches the synchronous run."""
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
        SamplingParams(
            temperature=0.9, presence_penalty=0.5, frequency_penalty=0.5, seed=3, max_tokens=16, ignore_eos=True
        ),
        # strong enough that greedy never repeats the token before, provided the one sampled by
        # the step in flight is counted
        SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0, max_tokens=40, ignore_eos=True),
    ]
    ps = prompts(4, seed=3)
    got, _, _ = same(tiny_checkpoint, ps, params, num_kv_blocks=64)
    unpenalized, _ = run(
        tiny_checkpoint,
        ps[3:],
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        overlap=True,
        num_kv_blocks=64,
    )

    def adjacent_repeats(tokens: list[int]) -> int:
        return sum(a == b for a, b in itertools.pairwise(tokens))

    assert adjacent_repeats(unpenalized[0].token_ids) > 0, "the case needs a model that repeats itself"
    assert adjacent_repeats(got[3].token_ids) == 0


def test_penalties_keep_a_step_in_flight(tiny_checkpoint: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), device="cpu", num_kv_blocks=32, async_scheduling=True))
    engine.add_request(
        "r", [1, 2, 3], SamplingParams(temperature=0.0, repetition_penalty=1.5, max_tokens=4, ignore_eos=True)
    )
    assert engine.step() == []  # queued, not waited for
    assert [d.new_token_ids for d in engine.step()] != []
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == 32


def test_stop_tokens(tiny_checkpoint: Path) -> None:
    ps = prompts(4, seed=4)
    free, _ = run(
        tiny_checkpoint,
        ps,
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
        overlap=False,
        num_kv_blocks=64,
    )
    params = [SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[o.token_ids[3]]) for o in free]
    got, _, _ = same(tiny_checkpoint, ps, params, num_kv_blocks=64)
    assert all(o.finish_reason == "stop" for o in got)


def test_preemption_and_chunked_prefill(tiny_checkpoint: Path) -> None:
    ps = prompts(10, seed=5, lo=20, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    _, _, engine = same(
        tiny_checkpoint, ps, params, num_kv_blocks=12, kv_block_size=16, max_num_batched_tokens=32, max_num_seqs=8
    )
    assert engine.scheduler.num_preemptions_total > 0


def test_prefix_cache_hits(tiny_checkpoint: Path) -> None:
    base = prompts(1, seed=6, lo=50, hi=50)[0]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, async_scheduling=True) as llm:
        first = llm.generate([base], params)[0]
        before = llm.engine.num_prompt_tokens_total
        # the first request's prompt and generated tokens (the KV computed for them) are cached blocks
        again = llm.generate([base + first.token_ids[:15]], params)[0]
        assert again.num_cached_tokens == 64
        assert llm.engine.num_prompt_tokens_total - before == len(base) + 15 - 64
    with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, enable_prefix_caching=False) as plain:
        assert plain.generate([base + first.token_ids[:15]], params)[0].token_ids == again.token_ids


def test_a_sequence_at_its_length_limit_is_not_scheduled_again(tiny_checkpoint: Path) -> None:
    """Its last token is still in flight when the next step is scheduled, but it can only finish: the
    step after it must not compute (and allocate KV for) a token that would be dropped."""
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_checkpoint), device="cpu", num_kv_blocks=32, async_scheduling=True, max_model_len=12
        )
    )
    launched: list[list[str]] = []
    launch = engine._launch

    def counting(plan, *rest):
        launched.append([e.seq.request_id for e in plan.entries])
        return launch(plan, *rest)

    engine._launch = counting  # type: ignore[method-assign]
    engine.add_request("five", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    engine.add_request(
        "model-len", [4, 5, 6, 7, 8, 9, 10, 11], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4)
    )  # all that fits
    tokens: dict[str, list[int]] = {"five": [], "model-len": []}
    while engine.has_unfinished_requests():
        for d in engine.step():
            tokens[d.request_id] += d.new_token_ids
    assert [len(tokens["five"]), len(tokens["model-len"])] == [5, 4]  # 12 - 8 prompt tokens
    # one prefill step and 4 (3) decode steps each: the step after the last token never runs
    assert sum("five" in step for step in launched) == 5 and sum("model-len" in step for step in launched) == 4
    assert engine.block_manager.num_free_blocks == 32


def test_abort_with_a_step_in_flight(tiny_checkpoint: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), device="cpu", num_kv_blocks=32, async_scheduling=True))
    for i, p in enumerate(prompts(3, seed=9, lo=30, hi=40)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    assert engine.step() == []  # the first step is in flight: nothing to report yet
    deltas = engine.step()  # reports the first step's tokens, the second is in flight
    assert sorted(d.request_id for d in deltas) == ["r0", "r1", "r2"]
    [final] = engine.abort_request("r1")
    assert final.finish_reason.value == "aborted" and final.num_output_tokens == 1
    assert all(d.request_id != "r1" for d in engine.step())  # the in-flight row of r1 is dropped
    for rid in ("r0", "r2"):
        engine.abort_request(rid)
    assert engine.block_manager.num_free_blocks == 32
    assert not engine.has_unfinished_requests()
    engine.add_request("r1", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [t for d in engine.step() for t in d.new_token_ids]
    assert len(tokens) == 3


def test_tensor_parallel_workers_get_the_sampled_ids(tiny_checkpoint: Path) -> None:
    """TP=2 (gloo): the workers fill pending tokens from rank 0's broadcast, a penalised request among
    the others; every token equals TP=1 without overlap."""
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 12, 20)]
    params.append(SamplingParams(temperature=0.0, repetition_penalty=1.2, max_tokens=6, ignore_eos=True))
    ps = prompts(4, seed=11)
    ref, _ = run(tiny_checkpoint, ps, params, overlap=False, num_kv_blocks=64)
    got, _ = run(tiny_checkpoint, ps, params, overlap=True, num_kv_blocks=64, tensor_parallel_size=2)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
