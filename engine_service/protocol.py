"""The engine's vocabulary, shared by the service side and the engine core; torch-free.

Everything that crosses between the gRPC side (``server.py``, ``async_engine.py``) and the engine core
(``core/``) is defined here, so a reader sees the whole protocol in one place:

- **values**: ``FinishReason``, ``TokenLogprob``, ``RequestOutput`` (one request's delta), ``EmbeddingOutput``
  (one Embed request's result), ``EngineInfo`` (a loaded engine's static facts), ``EngineStats`` (its load),
  the engine errors;
- **the length rule** (:func:`check_lengths`), the one place that says how long a prompt and its output may be;
- **commands** (server -> engine) and **events** (engine -> server), each carrying the engine-assigned
  ``internal_id`` of the request it concerns, never the client's ``request_id`` (a label the client may reuse);
- **KV-cache events** (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``), recorded by the block manager
  while someone subscribes (``WatchKvEvents``) and sent once per step as ``KvEvents``.

The events' byte form for the process boundary is in ``engine_service.event_codec``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine_service.pooling import PoolingConfig
from engine_service.sampling_params import SamplingParams
from service_common.validation import FieldError


class FinishReason(enum.Enum):
    STOP = "stop"  # an EOS id or one of stop_token_ids
    LENGTH = "length"  # max_tokens, or the model's max length
    ABORTED = "aborted"  # client cancel, deadline, Abort, or the server shutting down
    ERROR = "error"  # the engine failed while serving it


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the caller should retry later or elsewhere."""


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more requests (a worker died or a step failed)."""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the top-N alternatives, best first


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta; ``finished`` on the last one).

    ``request_id`` is the engine core's key for the request: behind the gRPC service it is the
    internal id the service assigned, never the client's label."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first scheduling (on the final output)
    # With SamplingParams.prompt_logprobs, on the request's first delta: prompt tokens 1..P-1 (token 0 has none)
    prompt_logprobs: list[TokenLogprob] | None = None
    index: int = 0  # which sample (of SamplingParams.n) this delta belongs to; finished is per sample

    def absorb(self, later: RequestOutput) -> None:
        """Append ``later``, the same sample's next delta, so that this one delta says what both said."""
        assert later.index == self.index, "deltas of two samples never merge"
        self.new_token_ids.extend(later.new_token_ids)
        if later.prompt_logprobs is not None:
            self.prompt_logprobs = (self.prompt_logprobs or []) + later.prompt_logprobs
        if later.new_logprobs:
            self.new_logprobs = (self.new_logprobs or []) + later.new_logprobs
        if later.finished:
            self.finished, self.finish_reason = True, later.finish_reason
            self.num_prompt_tokens, self.num_output_tokens = later.num_prompt_tokens, later.num_output_tokens
            self.num_cached_tokens, self.queue_time = later.num_cached_tokens, later.queue_time


def check_lengths(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """The length rule, for the service and the offline ``LLM`` alike: a prompt leaves room for at least one
    generated token, and prompt + ``max_tokens`` fits in ``max_model_len``. Returns the request's
    ``max_tokens`` (None: as much as fits, as vLLM does). Raises FieldError naming the field at fault."""
    if num_prompt_tokens < 1:
        raise FieldError("prompt_token_ids", "must not be empty")
    if num_prompt_tokens >= max_model_len:
        raise FieldError(
            "prompt_token_ids",
            f"the prompt has {num_prompt_tokens} tokens; the model's maximum length "
            f"is {max_model_len} including at least one generated token",
        )
    room = max_model_len - num_prompt_tokens
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise FieldError(
            "max_tokens",
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's "
            f"maximum length ({max_model_len})",
        )
    return max_tokens


@dataclass(frozen=True)
class EngineInfo:
    """A loaded engine's static facts: enough to describe it and to validate requests without it
    (the gRPC service holds this while the engine itself runs in another process)."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    tensor_parallel_size: int
    kv_block_size: int
    num_kv_blocks: int
    attention_backend: str
    max_waiting_requests: int
    pooling: PoolingConfig = field(default_factory=PoolingConfig)  # how Embed pools (the checkpoint says)

    def validate_embed(self, prompt_token_ids: list[int]) -> None:
        """Raise FieldError naming the field if this prompt cannot be embedded: the length rule of Generate
        (at most max_model_len - 1 tokens), ids inside the vocabulary."""
        check_lengths(len(prompt_token_ids), None, self.max_model_len)
        self._check_ids("prompt_token_ids", tuple(prompt_token_ids))

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise FieldError naming the field if this request can never be served. Sizes are checked
        before any per-token work, so a huge prompt is refused in O(1)."""
        check_lengths(len(prompt_token_ids), params.max_tokens, self.max_model_len)
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            bad = next(t for t in prompt_token_ids if not 0 <= t < self.vocab_size)
            raise FieldError("prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        self._check_ids("stop_token_ids", params.stop_token_ids)
        self._check_ids("allowed_token_ids", params.allowed_token_ids or ())
        for i, word in enumerate(params.bad_words):
            self._check_ids(f"bad_words[{i}]", word)
        bad_bias = next((t for t, _ in params.logit_bias if t >= self.vocab_size), None)
        if bad_bias is not None:
            raise FieldError(
                f"logit_bias[{bad_bias}]", f"token id {bad_bias} is outside the vocabulary [0, {self.vocab_size})"
            )
        if params.allowed_token_ids is not None:
            # Every allowed id banned would leave a row with no finite score: refuse it rather than emit an
            # id outside the allowed set.
            banned = {word[0] for word in params.bad_words if len(word) == 1}
            if params.min_tokens:
                banned.update(self.eos_token_ids, params.stop_token_ids)
            if banned.issuperset(params.allowed_token_ids):
                raise FieldError(
                    "allowed_token_ids",
                    "every allowed id is banned (one-id bad_words, or EOS and stop ids while min_tokens holds)",
                )

    def _check_ids(self, field: str, token_ids: tuple[int, ...]) -> None:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise FieldError(field, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")


@dataclass(frozen=True)
class EmbeddingOutput:
    """One Embed request's result; ``request_id`` is the engine core's key (the internal id behind the service)."""

    request_id: str
    embedding: list[float]  # [hidden_size]: the last prompt token's final-norm hidden state (normalised if asked)
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_kv_blocks: int
    num_preemptions_total: int
    prefix_cache_hit_rate: float


# ---- the prefix cache's events ------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockStored:
    """A full block entered the prefix cache: its chained hash (a signed 64-bit int), the hash of the block
    before it (None: the first block of a prompt), its token ids, and the salt it was hashed under."""

    block_hash: int
    parent_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    cache_salt: str = ""


@dataclass(frozen=True)
class BlockRemoved:
    """A cached hash left the cache (its block was reused for other tokens, or flushed)."""

    block_hash: int


@dataclass(frozen=True)
class AllBlocksCleared:
    """Forget every block of this engine; the ``BlockStored`` events that follow (if any) are its cache now."""


KvCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


# ---- commands: service -> engine ---------------------------------------------------------------------
@dataclass(frozen=True)
class AddRequest:
    """Admit a validated request (a refusal comes back as RequestFailed)."""

    internal_id: str  # assigned by the service; unique for the engine's lifetime
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower is scheduled first
    cache_salt: str = ""  # only requests with the same salt share prefix-cache blocks


@dataclass(frozen=True)
class AddEmbedRequest:
    """Embed a prompt: a prefill-only request, answered by an ``EmbeddingsReady`` event (or ``RequestFailed``)."""

    internal_id: str
    prompt_token_ids: list[int]
    normalize: bool  # L2-normalise the pooled state (the service resolves the checkpoint's default)


@dataclass(frozen=True)
class AbortRequest:
    """Drop a request and free its blocks now."""

    internal_id: str
    ticket: int | None  # answered by an AbortAnswered event when not None
    index: int | None = None  # one sample only (a stop string ended it); None: every sample


@dataclass(frozen=True)
class StopEngine:
    """Finish: emit what is held, answer EngineStopped, exit the loop."""


@dataclass(frozen=True)
class WatchKvEvents:
    """``subscriber`` not None: record KV events from now on (if not yet) and answer with a ``KvEvents``
    snapshot of the whole cache for that subscriber; None: nobody subscribes any more, stop recording."""

    subscriber: int | None


@dataclass(frozen=True)
class FlushCache:
    """Drop every cached block no live request holds; answered by ``CacheFlushed``."""

    ticket: int


Command = AddRequest | AddEmbedRequest | AbortRequest | StopEngine | WatchKvEvents | FlushCache


# ---- events: engine -> service -----------------------------------------------------------------------
@dataclass(frozen=True)
class EngineReady:
    """The engine loaded and serves; what the service side shows of it from now on."""

    info: EngineInfo
    stats: EngineStats


@dataclass(frozen=True)
class EngineLoadFailed:
    """Loading failed (the only event then); the engine process exits."""

    reason: str  # e.g. "ConfigError: ...: config field ..."


@dataclass(frozen=True)
class StepOutputs:
    """One step's deltas, each to the stream of its internal id."""

    outputs: list[RequestOutput]  # keyed by internal id
    stats: EngineStats


@dataclass(frozen=True)
class EmbeddingsReady:
    outputs: list[EmbeddingOutput]  # keyed by internal id; each ends its request
    stats: EngineStats


@dataclass(frozen=True)
class StatsUpdate:
    """Stats after commands changed them outside a step (an add or an abort while the engine is idle)."""

    stats: EngineStats


@dataclass(frozen=True)
class RequestFailed:
    """An AddRequest the engine refused."""

    internal_id: str
    error: Exception  # FieldError, EngineOverloadedError, ...: delivered to that stream only


@dataclass(frozen=True)
class AbortAnswered:
    """The answer to an AbortRequest that carried a ticket."""

    ticket: int
    found: bool  # False: the request had already ended


@dataclass(frozen=True)
class KvEvents:
    """Prefix-cache events in the order they happened: one step's (``subscriber`` None: for every subscriber),
    or a snapshot of the whole cache for one new or resyncing subscriber."""

    events: list[KvCacheEvent]
    subscriber: int | None = None


@dataclass(frozen=True)
class CacheFlushed:
    ticket: int
    dropped: int  # cached blocks dropped
    kept: int  # cached blocks kept, held by live requests


@dataclass(frozen=True)
class EngineStopped:
    """The loop ended: the last event."""

    reason: str
    died: bool  # True: a failure (health NOT_SERVING, exit non-zero); False: asked to stop


Event = (
    EngineReady
    | EngineLoadFailed
    | StepOutputs
    | EmbeddingsReady
    | StatsUpdate
    | RequestFailed
    | AbortAnswered
    | KvEvents
    | CacheFlushed
    | EngineStopped
)
