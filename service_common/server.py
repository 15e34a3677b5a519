"""Build, bind and run a ``grpc.aio`` server the same way for both services.

Usage (what ``python -m tokenizer_service`` and ``python -m engine_service`` do)::

    config = ServerConfig(max_concurrent_streams=1024, security=ServerSecurity(tls=..., api_key=...))
    server, health = build_server([SERVICE_NAME], config)
    add_MyServiceServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 50051, config.security)  # TLS if configured
    await server.start()
    await set_serving(health, [SERVICE_NAME], True)      # when ready to take requests
    await serve_until_signal(server, health, grace_s=10)  # SIGTERM/SIGINT: NOT_SERVING, drain, stop
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from service_common.admission import AdmissionInterceptor
from service_common.metrics import RpcMetricsInterceptor
from service_common.reflection import enable_reflection
from service_common.security import ServerSecurity, warn_if_exposed

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True)
class ServerConfig:
    """Transport settings of a server (validated; errors name the field)."""

    # Largest message either way. Prompts of 128k tokens are ~0.5-1 MB as packed uint32s; gRPC's
    # default 4 MiB receive limit is too tight for long conversations sent as text to the tokenizer.
    max_message_bytes: int = 64 * 1024 * 1024
    # Generation streams (the services' server-streaming RPCs) at once; beyond it they are answered
    # RESOURCE_EXHAUSTED. Health, GetModelInfo, GetLoad, Abort are never counted. None: no limit.
    max_concurrent_streams: int | None = 4096
    # Calls grpc core holds before the event loop picks them up. Its defaults (1,000, hard 3,000)
    # cancelled the excess of a burst (CANCELLED, no log line) before our handlers could answer
    # RESOURCE_EXHAUSTED; the stream limit and the engine's waiting queue are the real bounds.
    max_pending_calls: int = 100_000
    # Server pings idle connections this often, so that a stream quiet for minutes (a long prefill,
    # a slow queue) is not dropped by NATs / proxies, and a dead peer is noticed.
    keepalive_time_s: float = 30.0
    # A ping unanswered this long closes the connection.
    keepalive_timeout_s: float = 10.0
    # Clients may ping this often without being told to go away (too_many_pings).
    min_client_ping_interval_s: float = 10.0
    # TLS / mutual TLS and the API key (service_common.security); default plaintext, no key.
    security: ServerSecurity = field(default_factory=ServerSecurity)

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_concurrent_streams is not None and self.max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be >= 1 or None, got {self.max_concurrent_streams}")
        if self.max_pending_calls < 1:
            raise ValueError(f"max_pending_calls must be >= 1, got {self.max_pending_calls}")
        for name in ("keepalive_time_s", "keepalive_timeout_s", "min_client_ping_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def channel_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.min_client_ping_interval_s * 1000)),
            # Linux lets two servers share a port with SO_REUSEPORT (gRPC's default): a second instance
            # on a busy port would then start "fine" and receive half the traffic. Make it an error.
            ("grpc.so_reuseport", 0),
            ("grpc.server.max_pending_requests", self.max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", self.max_pending_calls),
        ]


class _ReflectionPool:
    """The default descriptor pool, also resolving methods (``pkg.Service.Method``) to their file.

    The upb-based protobuf runtime's ``FindFileContainingSymbol`` knows services, messages, fields and
    enums but not methods, so ``grpcurl describe pkg.Service.Method`` got "Symbol not found".
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # a FileDescriptor
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method_name = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is None or method_name not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class _HealthServicer(health_aio.HealthServicer):
    """grpcio-health-checking's aio servicer, plus ``List`` (it leaves it UNIMPLEMENTED, with a traceback)."""

    async def List(
        self,
        request: health_pb2.HealthListRequest,  # type: ignore[name-defined]  # List postdates types-grpcio-health-checking
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> health_pb2.HealthListResponse:  # type: ignore[name-defined]
        return health_pb2.HealthListResponse(  # type: ignore[attr-defined]
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()  # type: ignore[attr-defined]
            }
        )


# The admission interceptor of each server built here: the graceful shutdown waits on its stream count.
_ADMISSION: weakref.WeakKeyDictionary[grpc.aio.Server, AdmissionInterceptor] = weakref.WeakKeyDictionary()


def build_server(
    service_names: Sequence[str],
    config: ServerConfig | None = None,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, health_aio.HealthServicer]:
    """A server with the health service and reflection registered for ``service_names`` (full proto
    names, e.g. ``qwen3serve.engine.v1.EngineService``) and RPC metrics for them.

    Every service, and the server as a whole (""), starts NOT_SERVING: call :func:`set_serving`
    once ready. Add the servicers, then :func:`bind`, then ``await server.start()``.
    """
    config = config or ServerConfig()
    if not service_names:
        raise ValueError("service_names must name at least one service")
    admission = AdmissionInterceptor(service_names, config.max_concurrent_streams)
    server = grpc.aio.server(
        # Metrics outermost: UNAUTHENTICATED answers are counted too. Admission after the key check: a
        # refused caller takes no stream slot.
        interceptors=[RpcMetricsInterceptor(service_names), *config.security.interceptors(), admission, *interceptors],
        options=config.channel_options(),
    )
    _ADMISSION[server] = admission
    health = _HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection(server, [*service_names, HEALTH_SERVICE_NAME], pool=_ReflectionPool(descriptor_pool.Default()))
    # The aio HealthServicer starts "" as SERVING; nothing is ready yet. set() is async, but touching
    # the status map directly here keeps build_server usable before the event loop runs.
    for name in ("", *service_names):
        health._server_status[name] = health_pb2.HealthCheckResponse.NOT_SERVING  # type: ignore[attr-defined]
    return server, health


async def set_serving(health: health_aio.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    """Mark ``service_names`` and the whole server ("") SERVING or NOT_SERVING (ignored after shutdown began)."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *service_names):
        await health.set(name, status)


def bind(
    server: grpc.aio.Server, host: str = "127.0.0.1", port: int = 0, security: ServerSecurity | None = None
) -> int:
    """Listen on ``host:port``, with TLS when ``security.tls`` is set; port 0 picks a free port.
    Returns the bound port. Warns (once) when a non-loopback host gets neither TLS nor an API key.

    Raises OSError naming the address when it cannot be bound (in use, bad host).
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    tls = security.tls if security is not None else None
    _check_port_free(host, port, address)
    try:
        bound = server.add_insecure_port(address) if tls is None else server.add_secure_port(address, tls.credentials())
    except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind to address ...")
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    warn_if_exposed(host, security)
    return bound


def _check_port_free(host: str, port: int, address: str) -> None:
    """Raise OSError("cannot listen on ADDRESS: address already in use") before grpc tries: grpc's own
    failure is a core ERROR line plus a message that hides the cause."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {address}: {exc.strerror}") from exc
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise OSError(f"cannot listen on {address}: {(exc.strerror or str(exc)).lower()}") from exc


# After the grace period, how long aborted streams get to send their final message; then how long
# what is left (unary calls, health watches) gets before it is cancelled.
ABORT_WAIT_S = 5.0
LAST_CALLS_WAIT_S = 1.0


async def serve_until_signal(
    server: grpc.aio.Server,
    health: health_aio.HealthServicer,
    grace_s: float = 10.0,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    *,
    on_grace_end: Callable[[], Awaitable[None]] | None = None,
    until: Awaitable[object] | None = None,
) -> None:
    """Run a started server until one of ``signals`` arrives, ``until`` completes (e.g. the engine
    died) or the server stops by itself; then drain:

    1. health turns NOT_SERVING for every service and new RPCs are refused (UNAVAILABLE);
    2. running generation streams get ``grace_s`` seconds to finish;
    3. then ``on_grace_end()`` (the engine aborts every live request, so each stream ends with a final
       ABORTED message) and up to ABORT_WAIT_S for those messages; without it, grpc cancels the
       streams (UNAVAILABLE);
    4. what is left (unary calls, health watches) gets LAST_CALLS_WAIT_S, then the server stops.

    A second signal cuts the grace period short. The caller releases its own resources (engine,
    channels) after this returns.
    """
    loop = asyncio.get_running_loop()
    stop, hurry = asyncio.Event(), asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        if stop.is_set():
            log.warning("second signal: ending the running streams now", extra={"signal": sig.name})
            hurry.set()
        stop.set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)  # kept while draining: a second Ctrl-C is no traceback
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait())}
    if until is not None:
        waiters.add(asyncio.ensure_future(until))
    # Never cancelled: grpc's wait_for_termination awaits the server's own shutdown future, and
    # cancelling it would cancel that future and make server.stop() below raise CancelledError.
    termination = asyncio.ensure_future(server.wait_for_termination())
    try:
        await asyncio.wait({*waiters, termination}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        log.info("shutting down", extra={"signal": received[0] if received else "none", "grace_s": grace_s})
        await _drain(server, health, grace_s, on_grace_end, hurry)
        await termination
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    log.info("stopped")


async def _drain(
    server: grpc.aio.Server,
    health: health_aio.HealthServicer,
    grace_s: float,
    on_grace_end: Callable[[], Awaitable[None]] | None,
    hurry: asyncio.Event,
) -> None:
    admission = _ADMISSION.get(server)
    # Refuses new RPCs at once; cancels whatever still runs at the end of this (outer) deadline.
    stopping = asyncio.ensure_future(server.stop(grace_s + (ABORT_WAIT_S if on_grace_end else 0.0)))
    # Let the stop begin (the listener closes) before a health watcher hears NOT_SERVING: a client that
    # reacts by calling again then gets UNAVAILABLE, never a call cancelled by the shutdown (CANCELLED).
    await asyncio.sleep(0)
    await health.enter_graceful_shutdown()

    async def until_idle_or(timeout: float, *events: asyncio.Event) -> None:
        idle = asyncio.ensure_future(admission.wait_idle() if admission else asyncio.shield(stopping))
        extra = {asyncio.ensure_future(event.wait()) for event in events}
        _, pending = await asyncio.wait({idle, *extra}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()

    await until_idle_or(grace_s, hurry)
    if admission is not None and admission.active_streams and on_grace_end is not None:
        log.info("grace period over: aborting the streams still running", extra={"streams": admission.active_streams})
        await on_grace_end()
        await until_idle_or(ABORT_WAIT_S)
    if admission is not None and not admission.active_streams:
        await server.stop(LAST_CALLS_WAIT_S)  # shortens the outer deadline: no stream is left to wait for
    await stopping
