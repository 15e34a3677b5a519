"""Continuous batching: which sequences run this step, and how many new tokens each computes.

One token budget per step (``max_num_batched_tokens``) is shared by running sequences first (each
decode costs one token; a prompt still being prefilled continues with its next chunk) and then by
waiting sequences (new prompts, chunked to what the budget leaves). Prefill chunks and decodes share
steps, so a long prompt never stalls running streams.

When the KV pool runs out, the most recently admitted running sequence is preempted by recompute:
its blocks are freed and it goes back to the *front* of the waiting queue, to be resumed first
(its earlier blocks are often still in the prefix cache).

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
no blocks and is never planned.
"""

from __future__ import annotations

import time
from collections import deque

from engine_service.core.block_manager import BlockManager
from engine_service.core.sequence import Sequence, SequenceStatus
from engine_service.core.step_plan import PlannedSeq, StepPlan
from engine_service.protocol import FinishReason


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0
        self.num_prompt_tokens_computed = 0  # prompt tokens planned for computing (prefix-cache hits excluded)
        self._sample_rows: dict[Sequence, int] = {}  # the last plan's sampling rows: where pending tokens are

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

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
                victim = self.running.pop()
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

        # 2. Waiting sequences (preempted ones are at the front), unless this step had to preempt.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not bm.block_table(seq):
                seq.num_computed_tokens = bm.match_prefix(seq)
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
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
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
        self.waiting.appendleft(seq)

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
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_pending_tokens = 0
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ---- checks -------------------------------------------------------------------------------
    def check_invariants(self, sequences: list[Sequence]) -> None:
        """Raise AssertionError if the invariants of the module docstring do not hold for ``sequences``
        (every sequence ever added, finished ones included) and the block manager's (tests)."""
        assert len(self.running) <= self.max_num_seqs
        queued = {*self.running, *self.waiting}
        assert len(queued) == len(self.running) + len(self.waiting), "a sequence queued twice"
        bm = self.block_manager
        for seq in sequences:
            name = seq.request_id
            expected = {
                SequenceStatus.RUNNING: seq in self.running,
                SequenceStatus.WAITING: seq in self.waiting,
                SequenceStatus.FINISHED: seq not in queued,
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
