"""Parallel samples (n > 1) and request priority in the engine core, on CPU (fp32).

n samples of one prompt share its KV blocks (prefilled once) and each equals the same request run alone
with seed + index, token for token; aborting ends every sample and frees every block, and aborting or
preempting one sample leaves the others as they were. A saturated queue is admitted by (priority,
arrival), and the KV cache's victim is the lowest-priority, latest-arrived sequence.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine_service.config import EngineConfig
from engine_service.core.block_manager import BlockManager
from engine_service.core.engine import LLMEngine
from engine_service.core.scheduler import Scheduler
from engine_service.core.sequence import Sequence
from engine_service.protocol import FinishReason, RequestOutput
from engine_service.sampling_params import SamplingParams

PROMPT = [random.Random(3).randrange(500) for _ in range(40)]  # 2 full blocks of 16 + 8 tokens
SAMPLED = dict(temperature=1.0, top_k=50, max_tokens=10, ignore_eos=True)


def engine(checkpoint: Path, **options) -> LLMEngine:
    return LLMEngine(
        EngineConfig(model=str(checkpoint), device="cpu", kv_block_size=16, **{"num_kv_blocks": 64, **options})
    )


def run(core: LLMEngine) -> tuple[dict[tuple[str, int], list[int]], dict[tuple[str, int], RequestOutput], int]:
    """Step until idle: tokens and final output per (request, sample), and the most blocks held at once."""
    tokens: dict[tuple[str, int], list[int]] = {}
    finals: dict[tuple[str, int], RequestOutput] = {}
    peak = 0
    bm = core.block_manager
    while core.has_unfinished_requests():
        for out in core.step():
            tokens.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
            if out.finished:
                finals[(out.request_id, out.index)] = out
        peak = max(peak, bm.num_blocks - bm.num_free_blocks)
        core.scheduler.check_invariants([s for group in core.requests.values() for s in group])
    return tokens, finals, peak


def alone(checkpoint: Path, seeds: list[int], **options) -> tuple[list[list[int]], int, int]:
    """Each seed as its own n = 1 request, all at once: tokens per seed, peak blocks, prompt tokens computed."""
    core = engine(checkpoint, **options)
    for seed in seeds:
        core.add_request(f"s{seed}", PROMPT, SamplingParams(seed=seed, **SAMPLED))
    tokens, _, peak = run(core)
    return [tokens[(f"s{seed}", 0)] for seed in seeds], peak, core.num_prompt_tokens_total


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async-scheduling"])
def test_samples_share_the_prompt_and_each_equals_its_seed_run_alone(tiny_checkpoint: Path, overlap: bool) -> None:
    core = engine(tiny_checkpoint, async_scheduling=overlap)
    core.add_request("g", PROMPT, SamplingParams(n=4, seed=100, **SAMPLED))
    tokens, finals, peak = run(core)
    reference, separate_peak, separate_prompt = alone(tiny_checkpoint, [100, 101, 102, 103], async_scheduling=overlap)
    assert [tokens[("g", i)] for i in range(4)] == reference  # sample i = seed 100 + i, alone
    assert len({tuple(t) for t in reference}) == 4  # and the samples differ
    assert peak < separate_peak
    if not overlap:  # 48 tokens = 3 blocks each when separate (12); the 2 full prompt blocks held once (6)
        assert (peak, separate_peak) == (6, 12)
    assert core.num_prompt_tokens_total == 40 + 3 * 8 < separate_prompt == 4 * 40  # the prompt computed once
    for i in range(4):
        final = finals[("g", i)]
        assert final.finish_reason is FinishReason.LENGTH and final.num_output_tokens == 10
        assert final.num_prompt_tokens == 40 and final.num_cached_tokens == (0 if i == 0 else 32)
    assert core.block_manager.num_free_blocks == 64 and not core.requests


def test_unseeded_samples_are_independent(tiny_checkpoint: Path) -> None:
    core = engine(tiny_checkpoint)
    core.add_request("g", PROMPT, SamplingParams(n=3, **SAMPLED))
    tokens, _, _ = run(core)
    assert len({tuple(tokens[("g", i)]) for i in range(3)}) == 3


def test_abort_ends_every_sample_and_frees_every_block(tiny_checkpoint: Path) -> None:
    core = engine(tiny_checkpoint)
    core.add_request("g", PROMPT, SamplingParams(n=4, seed=1, **{**SAMPLED, "max_tokens": 50}))
    for _ in range(4):
        core.step()
    assert core.block_manager.num_free_blocks < 64
    finals = core.abort_request("g")
    assert sorted(f.index for f in finals) == [0, 1, 2, 3]
    assert all(f.finished and f.finish_reason is FinishReason.ABORTED for f in finals)
    assert core.block_manager.num_free_blocks == 64 and not core.has_unfinished_requests()
    assert core.abort_request("g") == []


def test_aborting_one_sample_leaves_the_others_alone(tiny_checkpoint: Path) -> None:
    core = engine(tiny_checkpoint)
    core.add_request("g", PROMPT, SamplingParams(n=3, seed=7, **SAMPLED))
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while len(tokens[1]) < 3:
        for out in core.step():
            tokens[out.index] += out.new_token_ids
    [final] = core.abort_request("g", index=1)
    assert final.index == 1 and final.finish_reason is FinishReason.ABORTED
    rest, _, _ = run(core)
    reference, _, _ = alone(tiny_checkpoint, [7, 9])
    assert [tokens[0] + rest[("g", 0)], tokens[2] + rest[("g", 2)]] == reference
    assert core.block_manager.num_free_blocks == 64


def test_preempted_samples_still_equal_their_seed_runs(tiny_checkpoint: Path) -> None:
    # 64 tokens each: the 2 shared prompt blocks + 2 own per sample = 10 blocks; with 6 samples are preempted
    long = {**SAMPLED, "max_tokens": 24}
    core = engine(tiny_checkpoint, num_kv_blocks=6)
    core.add_request("g", PROMPT, SamplingParams(n=4, seed=50, **long))
    tokens, _, _ = run(core)
    assert core.scheduler.num_preemptions_total > 0
    reference = engine(tiny_checkpoint)
    for seed in (50, 51, 52, 53):
        reference.add_request(f"s{seed}", PROMPT, SamplingParams(seed=seed, **long))
    expected, _, _ = run(reference)
    assert [tokens[("g", i)] for i in range(4)] == [expected[(f"s{seed}", 0)] for seed in (50, 51, 52, 53)]
    assert core.block_manager.num_free_blocks == 6


def test_a_saturated_queue_is_admitted_by_priority_then_arrival(tiny_checkpoint: Path) -> None:
    core = engine(tiny_checkpoint, max_num_seqs=1, max_num_batched_tokens=64)
    priorities = [3, 1, 2, 1, 0, 3, -1, 2]
    for i, priority in enumerate(priorities):
        core.add_request(f"r{i}", PROMPT[: 5 + i], SamplingParams(max_tokens=2, ignore_eos=True), priority=priority)
    order: list[str] = []
    while core.has_unfinished_requests():
        order += [out.request_id for out in core.step() if out.request_id not in order]
    expected = sorted(range(len(priorities)), key=lambda i: (priorities[i], i))
    assert order == [f"r{i}" for i in expected]


def test_the_kv_victim_is_the_lowest_priority_latest_arrival() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    urgent_late = Sequence("urgent", [1, 2, 3], params, seed=0, priority=0)
    lax_early = Sequence("lax", [4, 5, 6], params, seed=0, priority=5)
    scheduler.add(lax_early)  # arrives first, but matters less
    scheduler.add(urgent_late)
    plan = scheduler.schedule()
    assert [e.seq for e in plan.entries] == [urgent_late, lax_early]  # both admitted, in priority order
    scheduler.apply(plan, [7, 7])
    scheduler.apply(scheduler.schedule(), [7, 7])  # 4 tokens each: the 4 blocks are full
    scheduler.schedule()  # both need a 3rd block: the lax one is preempted
    assert lax_early.status.value == "waiting" and urgent_late.status.value == "running"
    assert lax_early.num_preemptions == 1 and urgent_late.num_preemptions == 0


@pytest.mark.parametrize("n", [0, -1])
def test_n_below_one_names_the_field(n: int) -> None:
    with pytest.raises(ValueError, match="n: must be >= 1"):
        SamplingParams(n=n)
