"""Prometheus metrics shared by both servers: an HTTP exporter and per-RPC request metrics.

:class:`RpcMetricsInterceptor` counts every RPC of the given services by method and final status
code, and times them (whole call, and the first message of a stream: time to first token for
Generate/Chat). Metric objects are module-level: prometheus_client refuses to register a name twice.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
import grpc.aio
import prometheus_client

from service_common.interceptor_types import Continuation, Handler

RPC_REQUESTS = prometheus_client.Counter(
    "qwen3serve_rpc_requests", "RPCs handled, by final status code", ["service", "method", "code"]
)
RPC_DURATION = prometheus_client.Histogram(
    "qwen3serve_rpc_duration_seconds",
    "Wall time of an RPC, to the end of its stream",
    ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
RPC_FIRST_RESPONSE = prometheus_client.Histogram(
    "qwen3serve_rpc_first_response_seconds",
    "Time from a streaming RPC's start to its first message",
    ["service", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int | None:
    """Serve ``/metrics`` over HTTP on ``host:port`` in a daemon thread; port 0 means off.

    Returns the bound port, or None when off. Raises OSError (naming the address) if it cannot bind.
    """
    if port < 0 or port > 65535:
        raise ValueError(f"metrics port must be in [0, 65535], got {port}")
    if port == 0:
        return None
    try:
        server, _thread = prometheus_client.start_http_server(port, addr=host)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
    return int(server.server_port)


def _split_method(full_method: str) -> tuple[str, str]:
    # "/qwen3serve.engine.v1.EngineService/Generate" -> ("qwen3serve.engine.v1.EngineService", "Generate")
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _final_code(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # client cancel or deadline
        return grpc.StatusCode.CANCELLED.name
    code: object = context.code()  # typed StatusCode, but see the int case below
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some grpcio versions keep the numeric code after abort
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))
    return grpc.StatusCode.OK.name if exc is None else grpc.StatusCode.UNKNOWN.name


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Records RPC_REQUESTS / RPC_DURATION / RPC_FIRST_RESPONSE for the unary and server-streaming
    methods of ``services`` (full names). Others (health, reflection) pass through unwrapped."""

    def __init__(self, services: Collection[str]) -> None:
        self._services = frozenset(services)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        service, method = _split_method(handler_call_details.method)
        if handler is None or service not in self._services:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    @staticmethod
    def _wrap_unary(
        behavior: Callable[..., Awaitable[Any]], service: str, method: str
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            exc: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as e:  # recorded, then re-raised unchanged
                exc = e
                raise
            finally:
                RPC_DURATION.labels(service, method).observe(time.perf_counter() - start)
                RPC_REQUESTS.labels(service, method, _final_code(context, exc)).inc()

        return wrapped

    @staticmethod
    def _wrap_stream(
        behavior: Callable[..., AsyncGenerator[Any, None]], service: str, method: str
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            start = time.perf_counter()
            first = True
            exc: BaseException | None = None
            responses = behavior(request, context)
            try:
                async for response in responses:
                    if first:
                        RPC_FIRST_RESPONSE.labels(service, method).observe(time.perf_counter() - start)
                        first = False
                    yield response
            except BaseException as e:  # recorded, then re-raised unchanged
                exc = e
                raise
            finally:
                await responses.aclose()
                RPC_DURATION.labels(service, method).observe(time.perf_counter() - start)
                RPC_REQUESTS.labels(service, method, _final_code(context, exc)).inc()

        return wrapped
