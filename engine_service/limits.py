"""Per-request limits of the engine service: what the servicer checks before any per-item work. Torch-free
and grpc-free, so ``--help`` shows the defaults without loading anything.

The prompt's own limit is the model's maximum length (``protocol.check_lengths``); the message size is the
server's transport limit (``--max-message-mb``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from service_common.validation import FieldError, check_count

#: Largest message the engine server receives or sends (``--max-message-mb``). A prompt of 128k token ids is
#: under 0.7 MB; gRPC parses a message on the event loop before any handler runs (a 30 MB prompt stalls every
#: stream for ~0.3 s), so the limit is kept near what a real request needs. Beyond it gRPC itself answers
#: RESOURCE_EXHAUSTED ("received message larger than max").
ENGINE_MAX_MESSAGE_BYTES = 8 * 2**20


@dataclass(frozen=True)
class RequestLimits:
    """Each field is a CLI option (``--max-request-id-bytes`` ...) with its ``help``; beyond a limit the
    request is answered INVALID_ARGUMENT naming the field."""

    max_request_id_bytes: int = field(default=256, metadata={"help": "longest request_id accepted"})
    max_stop_token_ids: int = field(default=256, metadata={"help": "most stop_token_ids one request may carry"})
    max_logit_bias: int = field(default=1024, metadata={"help": "most logit_bias entries one request may carry"})
    # A whole vocabulary (152k ids) is ~0.6 MB on the wire; the host flattens the list every step.
    max_allowed_token_ids: int = field(default=16384, metadata={"help": "most allowed_token_ids one request may carry"})
    # bad_words are compared with the output's tail on the host every step: words x length bounds that work.
    max_bad_words: int = field(default=128, metadata={"help": "most bad_words sequences one request may carry"})
    max_bad_word_tokens: int = field(default=32, metadata={"help": "most token ids in one bad_words sequence"})
    # Each sample is a sequence of its own (a batch row, a block table): n multiplies a request's cost.
    max_n: int = field(default=16, metadata={"help": "most parallel samples (sampling_params.n) one request may ask"})
    # Grammar compilation grows with the text (xgrammar: ~ms per KiB of schema, more for wide regex classes and
    # large enums); checked before compiling, so an oversized constraint costs the engine nothing.
    max_constraint_bytes: int = field(
        default=65536,
        metadata={"help": "largest structured-output constraint (json_schema, regex, grammar, all choices) in bytes"},
    )
    max_choices: int = field(default=1024, metadata={"help": "most strings in one choice constraint"})
    # a salt is kept on every cached block it filled: a tenant name or a digest, not a payload
    max_cache_salt_bytes: int = field(default=256, metadata={"help": "longest cache_salt accepted (UTF-8 bytes)"})

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be >= 1, got {getattr(self, f.name)}")


def check_constraint_size(field_path: str, num_choices: int, size_bytes: int, limits: RequestLimits) -> None:
    """FieldError naming ``field_path`` (``sampling_params.json_schema``) if a constraint is over the limits;
    checked before it is built or compiled."""
    check_count(field_path, num_choices, limits.max_choices, "choices")
    if size_bytes > limits.max_constraint_bytes:
        raise FieldError(field_path, f"is {size_bytes} bytes long; the limit is {limits.max_constraint_bytes}")


def check_request_id(request_id: str, limits: RequestLimits) -> None:
    """FieldError if ``request_id`` is longer than the limit (in UTF-8 bytes, as it came on the wire)."""
    _check_bytes("request_id", request_id, limits.max_request_id_bytes)


def check_cache_salt(cache_salt: str, limits: RequestLimits, field: str = "cache_salt") -> None:
    """FieldError naming ``field`` if ``cache_salt`` is longer than the limit (in UTF-8 bytes)."""
    _check_bytes(field, cache_salt, limits.max_cache_salt_bytes)


def _check_bytes(field: str, text: str, limit: int) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise FieldError(field, f"is {size} bytes long; the limit is {limit}")
