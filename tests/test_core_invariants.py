"""Property-based checks of the engine core's ownership invariants (scheduler + block manager, no model).

A hypothesis state machine adds requests, steps (with or without one step in flight, as async
scheduling does), finishes rows with a stop token or at max_tokens, and aborts requests at random,
over tiny KV pools that force preemption and prefix caching; requests carry random priorities, and some
ask n > 1 samples that share their prompt's blocks (parked, then forked). After every operation the invariants of
``Scheduler`` and ``BlockManager`` hold (``check_invariants``): no block leaks or is freed twice,
reference counts match the block tables, computed tokens never exceed the tokens a sequence has (at
most one of them still in flight); every plan leaves finished sequences out, fits its budget and its
blocks; and once every request is gone the whole pool is free.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from engine_service.core.block_manager import BlockManager
from engine_service.core.scheduler import Scheduler
from engine_service.core.sequence import Sequence
from engine_service.core.step_plan import StepPlan
from engine_service.protocol import FinishReason
from engine_service.sampling_params import SamplingParams

STOP_TOKEN = 0
VOCAB = 4  # a tiny vocabulary: prompts and outputs share prefixes, so the prefix cache gets hits

#: what the runs exercised, summed over all examples (a property that never preempts proves little)
coverage: Counter[str] = Counter()


class CoreMachine(RuleBasedStateMachine):
    """The engine's protocol over the real Scheduler and BlockManager: schedule, launch (a no-op),
    apply the previous plan's sampled ids (async) or this one's (sync), retire finished rows."""

    @initialize(
        num_blocks=st.integers(2, 8),
        block_size=st.sampled_from([1, 2, 4]),
        max_num_seqs=st.integers(2, 6),
        budget=st.integers(1, 24),
        overlap=st.booleans(),
        prefix_caching=st.booleans(),
    )
    def setup(
        self, num_blocks: int, block_size: int, max_num_seqs: int, budget: int, overlap: bool, prefix_caching: bool
    ) -> None:
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.bm, max_num_seqs, budget)
        self.overlap = overlap
        self.max_tokens_cap = num_blocks * block_size  # a request must fit the pool alone (the engine validates)
        self.seqs: list[Sequence] = []
        self.in_flight: StepPlan | None = None
        self.previous: StepPlan | None = None

    @rule(
        prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
        max_tokens=st.integers(1, 30),
        min_tokens=st.integers(0, 3),
    )
    def add_new(self, prompt: list[int], max_tokens: int, min_tokens: int) -> None:
        self.add(prompt, max_tokens, min_tokens)

    @rule(
        prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
        max_tokens=st.integers(1, 12),
        n=st.integers(2, 4),
        priority=st.integers(-1, 2),
    )
    def add_samples(self, prompt: list[int], max_tokens: int, n: int, priority: int) -> None:
        """A request for n samples of one prompt, at some priority."""
        self.add(prompt, max_tokens, 0, n, priority)

    def add(self, prompt: list[int], max_tokens: int, min_tokens: int, n: int = 1, priority: int = 0) -> None:
        room = self.max_tokens_cap - len(prompt)
        if room < 1:
            return
        max_tokens = min(max_tokens, room)
        params = SamplingParams(
            max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens), stop_token_ids=[STOP_TOKEN]
        )
        rid = f"r{len(self.seqs)}"
        samples = [Sequence(rid, prompt, params, seed=i, index=i, priority=priority) for i in range(n)]
        self.seqs += samples
        self.scheduler.add_group(samples)

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data())
    def add_again(self, data: st.DataObject) -> None:
        """A request repeating an earlier one's prompt and first outputs (a prefix-cache hit if still cached)."""
        earlier = data.draw(st.sampled_from(self.seqs))
        tokens = earlier.prompt_token_ids + earlier.output_token_ids
        self.add([*tokens[: data.draw(st.integers(1, len(tokens)))], 1], max_tokens=8, min_tokens=0)

    @precondition(lambda self: self.scheduler.num_unfinished > 0 or self.in_flight is not None)
    @rule(seed=st.integers(0, 2**32 - 1))
    def step(self, seed: int) -> None:
        rng = random.Random(seed)
        preemptions = self.scheduler.num_preemptions_total
        plan = self.scheduler.schedule()
        coverage["preemptions"] += self.scheduler.num_preemptions_total - preemptions
        self.check_plan(plan)
        self.scheduler.check_invariants(self.seqs)  # between the plan and its results too
        if self.overlap:
            if self.in_flight is not None:
                self.finish(self.in_flight, rng)
            self.in_flight = None if plan.is_empty else plan
        elif not plan.is_empty:
            self.finish(plan, rng)
        if not plan.is_empty:
            self.previous = plan

    @precondition(lambda self: self.scheduler.num_unfinished > 0)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        live = [s for s in self.seqs if not s.is_finished]
        seq = data.draw(st.sampled_from(live))
        if seq.num_pending_tokens:
            coverage["aborts with a token in flight"] += 1
        self.scheduler.finish(seq, FinishReason.ABORTED)

    def finish(self, plan: StepPlan, rng: random.Random) -> None:
        """What LLMEngine._finish does with a step's sampled ids, the model replaced by ``rng``."""
        sampled = [rng.randrange(VOCAB) for _ in plan.sampling]
        parked = self.scheduler.num_parked
        shared = sum(1 for b in self.bm._blocks if b.ref_count > 1)
        for row, seq in self.scheduler.apply(plan, sampled):
            n, p = len(seq.output_token_ids), seq.params
            assert seq.output_token_ids[-1] == sampled[row]
            if (n >= p.min_tokens and sampled[row] == STOP_TOKEN) or n >= p.max_tokens:
                self.scheduler.finish(seq, FinishReason.STOP if n < p.max_tokens else FinishReason.LENGTH)
        coverage["samples unparked"] += parked - self.scheduler.num_parked
        coverage["blocks forked"] += max(0, sum(1 for b in self.bm._blocks if b.ref_count > 1) - shared)

    def check_plan(self, plan: StepPlan) -> None:
        seqs = [e.seq for e in plan.entries]
        assert len(set(seqs)) == len(seqs), "a sequence planned twice"
        assert not any(s.is_finished for s in seqs), "a finished sequence was scheduled"
        assert plan.num_new_tokens <= self.scheduler.max_num_batched_tokens
        for e in plan.entries:
            assert e.num_new_tokens >= 1
            assert len(e.block_table) * self.bm.block_size >= e.context_len + e.num_new_tokens
            assert len(e.token_ids) == e.num_new_tokens - (e.pending_row is not None)
            assert e.token_ids == tuple(e.seq.token_ids(e.context_len, e.context_len + len(e.token_ids)))
            if e.pending_row is not None:
                coverage["pending inputs"] += 1
                assert self.overlap and self.previous is not None
                assert self.previous.sampling[e.pending_row].seq is e.seq

    @invariant()
    def ownership_invariants_hold(self) -> None:
        self.scheduler.check_invariants(self.seqs)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        coverage["prefix-cache hits"] += self.bm.prefix_cache_hits
        for seq in self.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORTED)
        self.scheduler.check_invariants(self.seqs)
        assert self.bm.num_free_blocks == self.bm.num_blocks, "a KV block leaked"


def test_random_add_step_finish_abort_keeps_the_core_invariants() -> None:
    coverage.clear()
    run_state_machine_as_test(
        CoreMachine,
        settings=settings(
            # derandomize: the same examples on every run (CI stays deterministic, the coverage asserts below
            # cannot flake); raise max_examples locally to search further
            max_examples=100,
            stateful_step_count=30,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    # the runs reached the cases the invariants are about
    print(dict(coverage))
    assert coverage["preemptions"] > 0 and coverage["pending inputs"] > 0
    assert coverage["aborts with a token in flight"] > 0 and coverage["prefix-cache hits"] > 0
    assert coverage["samples unparked"] > 0 and coverage["blocks forked"] > 0
