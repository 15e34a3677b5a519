"""Per-request limits of the engine service: what the servicer checks before any per-item work. Torch-free
and grpc-free, so ``--help`` shows the defaults without loading anything.

The prompt's own limit is the model's maximum length (``protocol.check_lengths``); the message size is the
server's transport limit (``--max-message-mb``)."""

from __future__ import annotations

from dataclasses import dataclass

from service_common.validation import FieldError

#: Largest message the engine server receives or sends (``--max-message-mb``). A prompt of 128k token ids is
#: under 0.7 MB; gRPC parses a message on the event loop before any handler runs (a 30 MB prompt stalls every
#: stream for ~0.3 s), so the limit is kept near what a real request needs. Beyond it gRPC itself answers
#: RESOURCE_EXHAUSTED ("received message larger than max").
ENGINE_MAX_MESSAGE_BYTES = 8 * 2**20


@dataclass(frozen=True)
class RequestLimits:
    max_request_id_bytes: int = 256
    max_stop_token_ids: int = 256

    def __post_init__(self) -> None:
        for name in ("max_request_id_bytes", "max_stop_token_ids"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def check_request_id(request_id: str, limits: RequestLimits) -> None:
    """FieldError if ``request_id`` is longer than the limit (in UTF-8 bytes, as it came on the wire)."""
    size = len(request_id.encode("utf-8", "surrogatepass"))
    if size > limits.max_request_id_bytes:
        raise FieldError("request_id", f"is {size} bytes long; the limit is {limits.max_request_id_bytes}")
