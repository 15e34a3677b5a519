"""A request's life inside the engine: its tokens, its status and its timings.

Who writes what (one writer per field; everyone else only reads):

- the **scheduler** (``Scheduler``) writes every mutable field: ``status``, ``arrival_order``, ``num_computed_tokens``,
  ``num_pending_tokens``, ``output_token_ids`` and the token timings (``Scheduler.apply``, when a
  step's sampled ids are read back), ``num_cached_prompt_tokens``, ``num_preemptions``,
  ``finish_reason`` (``Scheduler.finish``, on the engine's decision), ``first_scheduled_time``;
- the **block manager** writes nothing here: a sequence's KV blocks, block table and block hashes live
  in the ``BlockManager``, keyed by the sequence (``BlockManager.block_table(seq)``).

Invariants (checked by ``Scheduler.check_invariants``, tested property-based in tests/test_core_invariants.py):

- ``output_token_ids`` holds only ids read back from the device; a token that is sampled but not read
  back yet (async scheduling) is counted in ``num_pending_tokens``, never written as a stand-in value;
- ``num_computed_tokens <= num_tokens``, and at most one computed token is still pending: the one the
  step in flight sampled, which the next step takes as its input on the device;
- ``num_pending_tokens <= 2``: one step in flight, plus the step being launched.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine_service.protocol import FinishReason, RequestOutput
from engine_service.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"  # its structured-output grammar compiles; not queued yet
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    PARKED = "parked"  # a sample i > 0 of an n > 1 request, waiting for sample 0 to prefill the shared prompt
    FINISHED = "finished"


# eq=False: a sequence is an identity (the block manager keys its tables by it), never a value.
@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # effective sampling seed (drawn at admission if params.seed is None; seed + index for samples)
    index: int = 0  # which of the request's params.n samples this is; (request_id, index) is its identity
    priority: int = 0  # lower is scheduled first (GenerateRequest.priority)
    arrival_order: int = 0  # the scheduler's admission counter: FCFS among equal priorities
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)  # read back from the device, in order
    num_pending_tokens: int = 0  # sampled after output_token_ids, not read back yet
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (or queued to be)
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache (first admission)
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    # An Embed request (prefill only): whether to L2-normalise its pooled state. None: a generation request.
    embed_normalize: bool | None = None
    cache_salt: str = ""  # isolates its prefix-cache entries: only requests with the same salt share blocks

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens, counting those sampled but not read back yet."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Prompt + output tokens whose ids the host has."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens so far, counting those sampled but not read back yet."""
        return len(self.output_token_ids) + self.num_pending_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Known tokens ``start:end`` of prompt + output (``end <= num_known_tokens``), without
        concatenating the whole sequence."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]

    @property
    def reached_length_limit(self) -> bool:
        """Its last output token (perhaps still being sampled, with async scheduling) is the last it may
        have: it finishes when that token is read, and computes nothing more. (prompt + max_tokens fits
        max_model_len: validated.) ``num_output_tokens``, inlined: this runs for every running sequence
        on every step."""
        return len(self.output_token_ids) + self.num_pending_tokens >= self.params.max_tokens

    @property
    def is_embedding(self) -> bool:
        """An Embed request: computed like a prompt whose one sampled token is never output (its row's
        hidden state is the result), then retired (``max_tokens`` 1, so nothing is planned after it)."""
        return self.embed_normalize is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt's logprobs are still to be computed: asked for, and no output token yet (a sequence
        preempted after its first token recomputes its prompt without them). Of n samples, the first
        computes them for the request (the others share its prompt blocks)."""
        return self.params.prompt_logprobs is not None and self.index == 0 and not self.output_token_ids

    @property
    def queue_key(self) -> tuple[int, int, int]:
        """Its place in the waiting queue and among running sequences: (priority, arrival, sample index);
        the smallest is admitted first, the largest preempted first."""
        return (self.priority, self.arrival_order, self.index)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def final_output(self) -> RequestOutput:
        """Its last delta, without tokens: finish reason, usage and queue time (the engine adds a final token)."""
        queue_time = self.first_scheduled_time - self.arrival_time if self.first_scheduled_time else None
        return RequestOutput(
            self.request_id,
            [],
            None,
            True,
            self.finish_reason,
            self.num_prompt_tokens,
            len(self.output_token_ids),
            self.num_cached_prompt_tokens,
            queue_time,
            index=self.index,
        )
