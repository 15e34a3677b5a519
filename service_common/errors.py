"""Domain errors and their one mapping to gRPC status codes.

Handlers raise the domain error that says what went wrong; :func:`handle_errors` (a decorator for
unary and server-streaming ``grpc.aio`` handlers) turns it into a status:

==================  ===================  ===============================================================
exception           status code          meaning for the caller
==================  ===================  ===============================================================
InvalidArgument     INVALID_ARGUMENT     fix the request; the message and a ``google.rpc.BadRequest``
                                         detail name the field
FieldError          INVALID_ARGUMENT     (service_common.validation) the same, raised below the servicers
AlreadyExists       ALREADY_EXISTS       a live request already has this id; pick another or wait for it
NotFound            NOT_FOUND            the named thing (e.g. a request id) does not exist
Overloaded          RESOURCE_EXHAUSTED   this replica's queue is full; retry later (with backoff)
Unavailable         UNAVAILABLE          shutting down, dead, or an upstream is unreachable; retry
                                         elsewhere (the code load balancers and retry policies know)
DeadlineExceeded    DEADLINE_EXCEEDED    the deadline passed while an upstream call was running
anything else       INTERNAL             a bug: logged with the request id and traceback; the client
                                         gets only the request id, never internals
==================  ===================  ===============================================================

Overload is RESOURCE_EXHAUSTED (not UNAVAILABLE) so that clients can tell "busy" from "down"; a load
balancer that wants to retry busy replicas elsewhere can treat both alike.

The same table read backwards (:func:`from_rpc_error`) turns an upstream call's failure into a
domain error, so the tokenizer service answers an engine failure with the engine's status code.

An aio server interceptor cannot see the exceptions of a streaming body in a way that lets it still
set the status cleanly, hence a decorator on the handlers themselves.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service_common.logging import current_request_id
from service_common.validation import FieldError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class ServiceError(Exception):
    """Base of the domain errors. Raised as itself it means an internal failure (INTERNAL), whose
    message is logged but not sent to the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """The request is wrong; ``field`` is the path of the offending field, e.g. ``messages[2].role``."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class AlreadyExists(ServiceError):
    """The thing the request would create exists already (a live request with the same id)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class NotFound(ServiceError):
    """The thing the request names does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServiceError):
    """Too much work queued on this replica; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """The service (or the upstream it needs) cannot serve now: starting, shutting down, dead, unreachable."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed while an upstream call was still running."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_MAPPED_CODES = (InvalidArgument, AlreadyExists, NotFound, Overloaded, Unavailable, DeadlineExceeded)


def to_status(exc: BaseException, request_id: str = "") -> grpc.Status:
    """The status an exception becomes: code, message and trailing metadata (the rich status)."""
    if isinstance(exc, FieldError):
        exc = InvalidArgument(exc.field, exc.message)
    if isinstance(exc, _MAPPED_CODES):
        code, message = exc.code, exc.message
    else:
        code = grpc.StatusCode.INTERNAL
        message = f"internal error (request_id={request_id or '-'}); see the server log"
    st = status_pb2.Status(code=code.value[0], message=message)
    if isinstance(exc, InvalidArgument):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)
                ]
            )
        )
        st.details.append(detail)
    return rpc_status.to_status(st)


async def abort_with(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, request_id: str = "", method: str = ""
) -> None:
    """Log ``exc`` as befits its kind and end the RPC with its status. Always raises (AbortError)."""
    status = to_status(exc, request_id)
    if status.code == grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc, extra={"method": method, "request_id": request_id})
    elif status.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        log.warning("%s", status.details, extra={"method": method, "code": status.code.name, "request_id": request_id})
    else:
        log.info("%s", status.details, extra={"method": method, "code": status.code.name, "request_id": request_id})
    await context.abort(status.code, status.details, status.trailing_metadata)


def handle_errors(handler: F) -> F:
    """Decorate a ``grpc.aio`` servicer method (``async def`` or ``async def`` with ``yield``) so that
    exceptions become statuses by the table above.

    The request id in logs is the one bound with :func:`service_common.logging.bind_request_id`
    inside the handler, else the request's ``request_id`` field. ``context.abort`` called by the
    handler itself, and cancellation, pass through untouched. For streams the handler's generator is
    closed (its ``finally`` runs) as soon as the stream ends, errs or is cancelled.
    """

    def request_id_of(request: Any) -> str:
        return current_request_id() or str(getattr(request, "request_id", "") or "")

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream_wrapper(*args: Any) -> AsyncIterator[Any]:
            request, context = args[-2], args[-1]
            responses = handler(*args)
            try:
                async for response in responses:
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # every other exception becomes a status (INTERNAL if unknown)
                await abort_with(context, exc, request_id_of(request), handler.__qualname__)
            finally:
                # Cancellation lands at our `yield`, not inside the handler: close it now so that its
                # cleanup (e.g. cancelling an upstream call) runs at once, not at garbage collection.
                await responses.aclose()

        return stream_wrapper  # type: ignore[return-value]

    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def unary_wrapper(*args: Any) -> Any:
            request, context = args[-2], args[-1]
            try:
                return await handler(*args)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # every other exception becomes a status (INTERNAL if unknown)
                await abort_with(context, exc, request_id_of(request), handler.__qualname__)

        return unary_wrapper  # type: ignore[return-value]

    raise TypeError(f"handle_errors needs an async def handler, got {handler!r}")


def bad_request_field(err: grpc.RpcError) -> str | None:
    """The field named by the first ``BadRequest`` violation in a failed call's status, if any."""
    try:
        st = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:  # the rich status contradicts the call's code or message: treat as absent
        return None
    if st is None:
        return None
    for detail in st.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                return bad.field_violations[0].field
    return None


def from_rpc_error(err: grpc.RpcError, upstream: str) -> ServiceError:
    """The domain error that answers a failed call to ``upstream`` (a name for messages, e.g. "engine").

    INVALID_ARGUMENT keeps its field (the upstream's request mirrors ours); RESOURCE_EXHAUSTED,
    NOT_FOUND and DEADLINE_EXCEEDED keep their code; an unreachable, cancelled or shutting-down
    upstream is Unavailable; anything else is an internal error (message logged, not sent).
    """
    # Failed calls (sync grpc.Call errors and grpc.aio.AioRpcError alike) carry code() and details();
    # a bare RpcError does not.
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = bad_request_field(err) or ""
        prefix = f"{field}: "
        return InvalidArgument(field, details[len(prefix) :] if details.startswith(prefix) else details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(f"{upstream} overloaded: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{upstream}: {details}")
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return AlreadyExists(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded while waiting for the {upstream}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED):
        return Unavailable(f"{upstream} unavailable: {details}")
    return ServiceError(f"{upstream} failed with {code.name}: {details}")


__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "FieldError",
    "InvalidArgument",
    "NotFound",
    "Overloaded",
    "ServiceError",
    "Unavailable",
    "abort_with",
    "bad_request_field",
    "from_rpc_error",
    "handle_errors",
    "to_status",
]
