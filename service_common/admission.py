"""Two answers grpc does not give by itself, for every method of a server (an interceptor):

- **Unparseable bodies.** grpc parses a request with the generated ``X.FromString`` before the handler
  runs; a body protobuf rejects (e.g. invalid UTF-8 in a ``string`` field) then ends as UNKNOWN with a
  traceback in the log. Here the parse error is kept and the handler answers INVALID_ARGUMENT naming
  the message type.
- **A limit on generation streams.** grpc's ``maximum_concurrent_rpcs`` counts every RPC, health checks
  and GetLoad included, so a saturated server looked dead to its load balancer. Here only the
  server-streaming methods of the named services (Generate, Chat, Complete) count; beyond the limit
  they answer RESOURCE_EXHAUSTED naming it. Unary methods (health, GetModelInfo, GetLoad, Abort) are
  never throttled. The count also tells the graceful shutdown when every stream has ended.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from service_common.interceptor_types import Continuation, Handler

log = logging.getLogger(__name__)


class _Unparseable:
    """Stands in for a request protobuf could not parse; the handler wrapper answers INVALID_ARGUMENT."""

    def __init__(self, type_name: str, error: DecodeError) -> None:
        self.message = f"the request body is not a valid {type_name}: {error}"


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)  # X.FromString's class
    type_name = descriptor.full_name if descriptor is not None else "request message"

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Unparseable(type_name, exc)

    return parse


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Answers unparseable bodies INVALID_ARGUMENT (every method) and admits at most ``max_streams``
    server-streaming RPCs of ``limited_services`` at once (None: no limit; they are counted anyway)."""

    def __init__(self, limited_services: Collection[str], max_streams: int | None) -> None:
        self._limited = frozenset(limited_services)
        self.max_streams = max_streams
        self.active_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no limited stream is running."""
        await self._idle.wait()

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler:
        # grpc's handlers are namedtuples at run time (``_replace``); types-grpcio declares only the abstract class.
        handler: Any = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=parse, unary_unary=self._unary(handler.unary_unary))
        limited = details.method.lstrip("/").rpartition("/")[0] in self._limited
        if inspect.isasyncgenfunction(handler.unary_stream):
            return handler._replace(
                request_deserializer=parse, unary_stream=self._stream(handler.unary_stream, limited)
            )
        return handler._replace(
            request_deserializer=parse,  # a context.write handler, e.g. health Watch
            unary_stream=self._unary(handler.unary_stream),
        )

    @staticmethod
    def _unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Unparseable):
                await _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behavior(request, context)

        return guarded

    def _stream(
        self, behavior: Callable[..., AsyncGenerator[Any, None]], limited: bool
    ) -> Callable[..., AsyncIterator[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if isinstance(request, _Unparseable):
                await _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
            if not limited:
                async for response in behavior(request, context):
                    yield response
                return
            if self.max_streams is not None and self.active_streams >= self.max_streams:
                await _refuse(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many concurrent streams: this server takes at most {self.max_streams} "
                    f"(--max-concurrent-streams); retry later",
                )
            self.active_streams += 1
            self._idle.clear()
            responses = behavior(request, context)
            try:
                async for response in responses:
                    yield response
            finally:
                await responses.aclose()
                self.active_streams -= 1
                if self.active_streams == 0:
                    self._idle.set()

        return guarded


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str) -> None:
    log.info("%s", message, extra={"code": code.name})
    await context.abort(code, message)
