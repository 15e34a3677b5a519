"""Continuous batching: which sequences run this step, and how many new tokens each computes.

One token budget per step (``max_num_batched_tokens``) is shared by running sequences first (each
decode costs one token; a prompt still being prefilled continues with its next chunk) and then by
waiting sequences (new prompts, chunked to what the budget leaves). Prefill chunks and decodes share
steps, so a long prompt never stalls running streams.

Priority: waiting sequences are admitted in (priority, arrival) order (``waiting_queue.py``, a heap:
lower priority values first, first come first served among equals), and running ones are kept in the
same order, so each step serves the most urgent first. When the KV pool runs out, the *last* running
sequence in that order (the largest priority value, the latest arrived among equals) is preempted by
recompute: its blocks are freed and it goes back to the waiting queue with its original key, so it is
resumed before anything of its priority that arrived after it (its earlier blocks are often still in
the prefix cache). Admission never preempts: a high-priority arrival waits for blocks to free up.

Parallel samples (``params.n > 1``, one ``Sequence`` per sample, see ``add_group``): sample 0 (the
leader) is queued; samples 1..n-1 are *parked* until the step that finishes the leader's prompt has
been applied. Then each is forked the prompt's full blocks (``BlockManager.fork``: shared by reference
count, K/V computed once) and queued with the leader's key, so it recomputes only the prompt's last
partial block (at most ``block_size`` tokens, at least one: the logits it samples its first token
from). From then on a sample is an ordinary sequence: it is preempted, aborted or finished on its own
and its siblings keep their blocks. If the leader ends or is aborted while samples are parked, they are
queued without a fork (the prefix cache may still serve the prompt).

The scheduler is the one writer of sequence state (status, computed and pending token counts, output
tokens; see ``sequence.py``) and asks the ``BlockManager`` for blocks. ``schedule`` returns an immutable
``StepPlan`` and commits it at once; ``apply`` turns the step's ``StepResult`` into known tokens;
``finish`` retires a sequence. Protocol: at most one plan is launched and not yet applied when
``schedule`` runs (async scheduling keeps one step in flight), so every pending token a plan takes
as input was sampled by the previous plan.

Invariants (``check_invariants``; tested property-based in tests/test_core_invariants.py): a sequence
is in ``waiting`` or ``running`` exactly when it is unfinished, and in the queue its status names;
running sequences never exceed ``max_num_seqs``; every running sequence's blocks cover its computed
tokens; ``num_computed_tokens <= num_tokens`` with at most one computed token still pending, and
below ``prompt + max_tokens`` (the last allowed token is never an input); a finished sequence holds
no blocks and is never planned; a parked sample holds no blocks, has computed nothing, and its leader
is unfinished and not yet through its prompt.
"""

from __future__ import annotations

import bisect
import itertools
import time

from engine_service.core.block_manager import BlockManager
from engine_service.core.sequence import Sequence, SequenceStatus
from engine_service.core.step_plan import PlannedSeq, StepPlan
from engine_service.core.waiting_queue import WaitingQueue
from engine_service.protocol import FinishReason


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = WaitingQueue()
        self.running: list[Sequence] = []  # sorted by Sequence.queue_key: the last one is preempted first
        self.parked: dict[Sequence, list[Sequence]] = {}  # leader -> its samples waiting for its prompt
        self._arrivals = itertools.count()
        self.num_preemptions_total = 0
        self.num_prompt_tokens_computed = 0  # prompt tokens planned for computing (prefix-cache hits excluded)
        self._sample_rows: dict[Sequence, int] = {}  # the last plan's sampling rows: where pending tokens are

    @property
    def num_parked(self) -> int:
        return sum(map(len, self.parked.values()))

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + (self.num_parked if self.parked else 0)

    def add(self, seq: Sequence) -> None:
        self.add_group([seq])

    def add_group(self, samples: list[Sequence]) -> None:
        """Queue one request's samples (index order; one for n = 1): the first now, the rest parked until
        its prompt is computed. They share one arrival, so they sort together by (priority, arrival)."""
        arrival = next(self._arrivals)
        for seq in samples:
            seq.arrival_order = arrival
        leader, rest = samples[0], samples[1:]
        leader.status = SequenceStatus.WAITING
        self.waiting.push(leader)
        if rest:
            for seq in rest:
                seq.status = SequenceStatus.PARKED
            self.parked[leader] = list(rest)

    def _unpark(self, leader: Sequence, share: bool) -> None:
        """Queue ``leader``'s parked samples, each forked the prompt's full blocks when ``share``."""
        bm = self.block_manager
        for seq in self.parked.pop(leader):
            if share:
                # the block holding the prompt's last token stays private: each sample computes that token
                seq.num_computed_tokens = bm.fork(seq, leader, seq.num_prompt_tokens - 1)
                seq.num_cached_prompt_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.WAITING
            self.waiting.push(seq)

    # ---- planning -----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Decide this step and commit it: each planned sequence's tokens count as computed, and each
        sampling row's next token as pending, from now on."""
        budget = self.max_num_batched_tokens
        entries: list[PlannedSeq] = []
        preempted = False
        bm = self.block_manager

        # 1. Running sequences, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.reached_length_limit:  # its last token is in flight (async scheduling): nothing to compute
                i += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.allocate(seq, seq.num_computed_tokens + num_new):
                victim = self.running.pop()  # the lowest priority, latest arrived
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                entries.append(self._commit(seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # seq itself was preempted: it was the newest, nothing after it runs

        # 2. Waiting sequences by (priority, arrival), unless this step had to preempt.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek()
            if not bm.block_table(seq):
                # Prompt logprobs need every position's logits: no prefix-cache hits for such a prompt (as vLLM).
                seq.num_computed_tokens = 0 if seq.wants_prompt_logprobs else bm.match_prefix(seq)
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = seq.num_computed_tokens
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.allocate(seq, seq.num_computed_tokens + num_new):
                if not self.running:
                    # Nothing will free blocks: try a smaller chunk so the queue cannot stall forever.
                    fit = (len(bm.block_table(seq)) + bm.num_free_blocks) * bm.block_size - seq.num_computed_tokens
                    if fit > 0 and bm.allocate(seq, seq.num_computed_tokens + fit):
                        num_new = fit
                    else:
                        break
                else:
                    bm.free(seq)  # give back the prefix-cache hits; retry next step
                    seq.num_computed_tokens = 0
                    break
            self.waiting.pop()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            bisect.insort(self.running, seq, key=_queue_key)
            entries.append(self._commit(seq, num_new))
            budget -= num_new

        plan = StepPlan(tuple(entries))
        self._sample_rows = {e.seq: row for row, e in enumerate(plan.sampling)}
        return plan

    def _commit(self, seq: Sequence, num_new: int) -> PlannedSeq:
        """``seq``'s row of the plan; its ``num_new`` tokens count as computed from now on."""
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
        prompt_len = len(seq.prompt_token_ids)
        if start < prompt_len:
            self.num_prompt_tokens_computed += min(num_new, prompt_len - start)
        known = prompt_len + len(seq.output_token_ids)
        pending_row = None
        if end > known:  # its last new token was sampled by the plan in flight and is not read back yet
            if end != known + 1 or seq not in self._sample_rows:
                raise RuntimeError(
                    f"{seq.request_id}: tokens {known}..{end} are not known and not in flight; "
                    "a plan was scheduled before the one before it was applied"
                )
            pending_row = self._sample_rows[seq]
            end_known = known
        else:
            end_known = end
        samples = end == known + seq.num_pending_tokens  # its last token: it samples the next
        entry = PlannedSeq(
            seq,
            start,
            num_new,
            tuple(seq.token_ids(start, end_known)) if end_known > start else (),
            self.block_manager.block_table(seq),
            samples,
            pending_row,
        )
        seq.num_computed_tokens = end
        if samples:
            seq.num_pending_tokens += 1
        return entry

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.push(seq)

    # ---- results ------------------------------------------------------------------------------
    def apply(self, plan: StepPlan, sampled_ids: list[int]) -> list[tuple[int, Sequence]]:
        """The one place where sampled ids become known tokens: row i's id (of ``plan.sampling``) is
        appended to its sequence's output and leaves the pending count. Sequences finished or aborted
        since the plan was made are skipped (their pending tokens were dropped with them). Then the
        blocks those tokens filled enter the prefix cache. Returns (row, sequence) of the live rows."""
        now = time.monotonic()
        live = []
        for row, e in enumerate(plan.sampling):
            seq = e.seq
            if seq.is_finished:
                continue
            if seq in self.parked:  # its prompt is computed: its samples share it from now on
                self._unpark(seq, share=True)
            seq.output_token_ids.append(sampled_ids[row])
            seq.num_pending_tokens -= 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.last_token_time = now
            live.append((row, seq))
        for e in plan.entries:
            if not e.seq.is_finished:
                self.block_manager.cache_full_blocks(e.seq)  # every token it has computed is known now
        return live

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take ``seq`` out of the queues and return its blocks at once (finish or abort); tokens it
        has in flight are dropped."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.PARKED:
            leader = next(lead for lead, samples in self.parked.items() if seq in samples)
            self.parked[leader].remove(seq)
            if not self.parked[leader]:
                del self.parked[leader]
        if seq in self.parked:  # ended before its prompt was through: its samples go on alone
            self._unpark(seq, share=False)
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_pending_tokens = 0
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ---- checks -------------------------------------------------------------------------------
    def check_invariants(self, sequences: list[Sequence]) -> None:
        """Raise AssertionError if the invariants of the module docstring do not hold for ``sequences``
        (every sequence ever added, finished ones included) and the block manager's (tests)."""
        assert len(self.running) <= self.max_num_seqs
        keys = [s.queue_key for s in self.running]
        assert keys == sorted(keys), "running sequences out of (priority, arrival) order"
        parked = {s: leader for leader, samples in self.parked.items() for s in samples}
        queued = {*self.running, *self.waiting, *parked}
        assert len(queued) == len(self.running) + len(self.waiting) + len(parked), "a sequence queued twice"
        for seq, leader in parked.items():
            assert not leader.is_finished and leader.status is not SequenceStatus.PARKED, "parked behind no leader"
            assert seq.request_id == leader.request_id and seq.index > leader.index
            assert not self.block_manager.block_table(seq) and seq.num_computed_tokens == 0, "a parked sample computes"
        bm = self.block_manager
        for seq in sequences:
            name = seq.request_id
            expected = {
                SequenceStatus.RUNNING: seq in self.running,
                SequenceStatus.WAITING: seq in self.waiting,
                SequenceStatus.FINISHED: seq not in queued,
                SequenceStatus.PARKED: seq in parked,
                SequenceStatus.WAITING_FOR_GRAMMAR: seq not in queued,
            }
            assert expected[seq.status], f"{name}: {seq.status.value} but queued elsewhere"
            assert 0 <= seq.num_computed_tokens <= seq.num_tokens, f"{name}: computes beyond its tokens"
            assert seq.num_computed_tokens <= seq.num_known_tokens + 1, f"{name}: computes two unknown tokens"
            assert 0 <= seq.num_pending_tokens <= 2, f"{name}: {seq.num_pending_tokens} tokens pending"
            assert seq.num_computed_tokens < seq.num_prompt_tokens + seq.params.max_tokens, (
                f"{name}: computed its last allowed token, which is never an input"
            )
            assert len(bm.block_table(seq)) * bm.block_size >= seq.num_computed_tokens, (
                f"{name}: computed tokens outside its blocks"
            )
            if seq.is_finished:
                assert not bm.block_table(seq) and seq.num_pending_tokens == 0, f"{name}: finished, still holds state"
        bm.check_invariants()


def _queue_key(seq: Sequence) -> tuple[int, int, int]:
    return seq.queue_key
