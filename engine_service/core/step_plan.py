"""The typed boundary of one engine step: the scheduler's ``StepPlan`` going in, a ``StepResult`` coming back.

``Scheduler.schedule`` returns a plan and has already committed it (computed-token counts advanced,
one pending token counted per sampling row); the engine launches it (``StepExecutor``) and, once the
sampled ids are on the host, hands the ``StepResult`` to ``Scheduler.apply``, the one place where
sampled ids become known tokens. Both are immutable: nothing downstream of the scheduler changes a
decision, and nothing but ``Scheduler.apply`` turns a result into sequence state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from engine_service.core.sequence import Sequence
from engine_service.core.step_input import PendingTokens, PromptLogprobsInput, StepInput


class PlannedSeq(NamedTuple):
    """One sequence's part of a step (a NamedTuple: immutable, and cheap to build per row per step)."""

    seq: Sequence
    context_len: int  # tokens already computed: the position of its first new token
    num_new_tokens: int  # tokens whose K/V this step computes, positions context_len onwards
    token_ids: tuple[int, ...]  # the known ids among them: all, or all but the last when pending_row is set
    block_table: tuple[int, ...]  # snapshot of its KV blocks, covering context_len + num_new_tokens
    samples: bool  # this step reaches its last token, so it samples the next
    pending_row: int | None  # its last new token is the one it sampled at this row of the step in flight


class PromptLogprobSpan(NamedTuple):
    """Prompt tokens ``first_token .. first_token + count - 1`` of ``seq`` get their logprobs from this step."""

    seq: Sequence
    first_token: int  # >= 1: the first prompt token has no logprob (nothing precedes it)
    count: int


@dataclass(frozen=True)
class StepPlan:
    """What one step computes, sequence by sequence (running ones first, then newly admitted ones).

    Invariants (tested): no finished sequence appears; each sequence appears at most once; each row's
    block table covers ``context_len + num_new_tokens``; the rows' new tokens fit the step's budget.
    """

    entries: tuple[PlannedSeq, ...]

    @property
    def is_empty(self) -> bool:
        return not self.entries

    @cached_property
    def sampling(self) -> tuple[PlannedSeq, ...]:
        """The rows that sample, in the order of the sampled ids (row i of a ``StepResult``)."""
        return tuple(e for e in self.entries if e.samples)

    @cached_property
    def prompt_logprob_spans(self) -> tuple[PromptLogprobSpan, ...]:
        """Per row that still wants prompt logprobs and computes prompt positions before the last: the prompt
        tokens those positions predict (read once, at launch, and kept: the engine maps results by it)."""
        spans = []
        for e in self.entries:
            if e.seq.wants_prompt_logprobs:
                end = min(e.context_len + e.num_new_tokens, e.seq.num_prompt_tokens - 1)
                if end > e.context_len:
                    spans.append(PromptLogprobSpan(e.seq, e.context_len + 1, end - e.context_len))
        return tuple(spans)

    @cached_property
    def embed_rows(self) -> tuple[int, ...]:
        """Sampling rows (of ``sampling``) of Embed requests: their last prompt token's hidden state is the result."""
        return tuple(i for i, e in enumerate(self.sampling) if e.seq.is_embedding)

    def _prompt_logprobs_input(self) -> PromptLogprobsInput | None:
        if not self.prompt_logprob_spans:
            return None
        flat_of_position_0, flat = {}, 0  # per sequence: where its position 0 would sit in the flat token list
        for e in self.entries:
            flat_of_position_0[e.seq] = flat - e.context_len
            flat += e.num_new_tokens
        positions: list[int] = []
        targets: list[int] = []
        for span in self.prompt_logprob_spans:
            start = flat_of_position_0[span.seq] + span.first_token - 1  # position first_token - 1 predicts it
            positions += range(start, start + span.count)
            targets += span.seq.prompt_token_ids[span.first_token : span.first_token + span.count]
        num_top = max(span.seq.params.prompt_logprobs or 0 for span in self.prompt_logprob_spans)
        return PromptLogprobsInput(tuple(positions), tuple(targets), num_top)

    @property
    def num_new_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries)

    def model_input(self, share_sampled: bool) -> StepInput:
        """The plan without its sequences: what the model runner on every rank consumes."""
        if not self.entries:
            raise ValueError("an empty plan has no model input")
        # One transpose of the rows into columns, in C: a step of 256 rows is built on a host the device waits for.
        _, context_lens, num_new, token_ids, tables, sample_rows, pending_rows = zip(*self.entries)
        pending = None
        if pending_rows.count(None) != len(pending_rows):
            ends = list(itertools.accumulate(num_new))  # per row, the flat index after its last new token
            rows = tuple(row for row, source in enumerate(pending_rows) if source is not None)
            # only ever a row's last new token is pending
            pending = PendingTokens(rows, tuple(ends[row] - 1 for row in rows), tuple(pending_rows[r] for r in rows))
        return StepInput(
            token_ids,
            context_lens,
            tables,
            sample_rows,
            pending,
            share_sampled and bool(self.sampling),
            self._prompt_logprobs_input(),
            self.embed_rows,
        )


@dataclass(frozen=True)
class StepResult:
    """A step's sampling, read back to the host: one entry per row of ``StepPlan.sampling``."""

    token_ids: list[int]  # [S]
    logprobs: list[float] | None = None  # [S] when some row asked for logprobs
    top_ids: list[list[int]] | None = None  # [S, N] most likely first, when some row asked for N > 0
    top_logprobs: list[list[float]] | None = None
    # Per position of ``StepPlan.prompt_logprob_spans`` (span after span), when the plan has any:
    prompt_logprobs: list[float] | None = None  # [P] the prompt token's logprob
    prompt_top_ids: list[list[int]] | None = None  # [P, N] when some span asked for N > 0 alternatives
    prompt_top_logprobs: list[list[float]] | None = None
    embeddings: list[list[float]] | None = None  # [E, hidden] per row of ``StepPlan.embed_rows``
