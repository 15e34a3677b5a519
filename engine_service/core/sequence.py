"""A request's life inside the engine: its tokens, its KV blocks, its status and its timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine_service.protocol import FinishReason
from engine_service.sampling_params import SamplingParams


#: Stands in an output token that is sampled but not yet read back from the device (async scheduling).
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued, or preempted and waiting to be recomputed
    RUNNING = "running"    # holds KV blocks and is scheduled every step
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int                               # effective sampling seed (drawn at admission if params.seed is None)
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0            # tokens whose K/V are in the cache
    num_cached_prompt_tokens: int = 0       # prompt tokens served by the prefix cache (first admission)
    num_hashed_blocks: int = 0              # leading blocks registered in the prefix cache
    block_hashes: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of prompt + output, without concatenating the whole sequence."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - prompt_len]

    @property
    def reached_length_limit(self) -> bool:
        """Its last output token (perhaps still being sampled, with async scheduling) is the last it may
        have: it finishes when that token is read, and computes nothing more."""
        return len(self.output_token_ids) >= self.params.max_tokens  # which fits max_model_len: validated

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
