"""Continuous batching: which sequences run this step, and how many new tokens each computes.

One token budget per step (``max_num_batched_tokens``) is shared by running sequences first (each
decode costs one token; a prompt still being prefilled continues with its next chunk) and then by
waiting sequences (new prompts, chunked to what the budget leaves). Prefill chunks and decodes share
steps, so a long prompt never stalls running streams.

When the KV pool runs out, the most recently admitted running sequence is preempted by recompute:
its blocks are freed and it goes back to the *front* of the waiting queue, to be resumed first
(its earlier blocks are often still in the prefix cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from engine_service.core.block_manager import BlockManager
from engine_service.core.sequence import Sequence, SequenceStatus
from engine_service.protocol import FinishReason


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int      # tokens whose K/V this step computes
    samples: bool            # this step reaches the sequence's last known token, so it samples the next


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = 0
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
                preempted += 1
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens + num_new == seq.num_tokens))
                budget -= num_new
                i += 1
                continue
            break  # seq itself was preempted: it was the newest, nothing after it runs

        # 2. Waiting sequences (preempted ones are at the front), unless this step had to preempt.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                cached = bm.match_prefix(seq)
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = cached
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.allocate(seq, seq.num_computed_tokens + num_new):
                if not self.running:
                    # Nothing will free blocks: try a smaller chunk so the queue cannot stall forever.
                    fit = (len(seq.block_table) + bm.num_free_blocks) * bm.block_size - seq.num_computed_tokens
                    if fit > 0 and bm.allocate(seq, seq.num_computed_tokens + fit):
                        num_new = fit
                    else:
                        break
                else:
                    bm.free(seq)  # give back the prefix-cache hits; retry next step
                    break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens + num_new == seq.num_tokens))
            budget -= num_new

        self.num_preemptions_total += preempted
        return SchedulerOutput(scheduled, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take ``seq`` out of the queues and return its blocks at once (finish or abort)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
