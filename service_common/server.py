"""Build, bind and run a ``grpc.aio`` server the same way for both services.

Usage (what ``python -m tokenizer_service`` and ``python -m engine_service`` do)::

    config = ServerConfig(max_concurrent_rpcs=1024, security=ServerSecurity(tls=..., api_key=...))
    server, health = build_server([SERVICE_NAME], config)
    add_MyServiceServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 50051, config.security)  # TLS if configured
    await server.start()
    await set_serving(health, [SERVICE_NAME], True)      # when ready to take requests
    await serve_until_signal(server, health, grace_s=10)  # SIGTERM/SIGINT: NOT_SERVING, then stop(grace)
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from service_common.metrics import RpcMetricsInterceptor
from service_common.security import ServerSecurity, warn_if_exposed

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True)
class ServerConfig:
    """Transport settings of a server (validated; errors name the field)."""

    # Largest message either way. Prompts of 128k tokens are ~0.5-1 MB as packed uint32s; gRPC's
    # default 4 MiB receive limit is too tight for long conversations sent as text to the tokenizer.
    max_message_bytes: int = 64 * 1024 * 1024
    # RPCs in flight at once; beyond it gRPC answers RESOURCE_EXHAUSTED at once. None: no limit.
    max_concurrent_rpcs: int | None = None
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
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1 or None, got {self.max_concurrent_rpcs}")
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
        ]


class _ReflectionPool:
    """The default descriptor pool, also resolving methods (``pkg.Service.Method``) to their file.

    The upb-based protobuf runtime's ``FindFileContainingSymbol`` knows services, messages, fields and
    enums but not methods, so ``grpcurl describe pkg.Service.Method`` got "Symbol not found".
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str):  # noqa: N802 (the pool's API)
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

    def __getattr__(self, name: str):
        return getattr(self._pool, name)


def build_server(service_names: Sequence[str], config: ServerConfig | None = None,
                 interceptors: Iterable[grpc.aio.ServerInterceptor] = ()
                 ) -> tuple[grpc.aio.Server, health_aio.HealthServicer]:
    """A server with the health service and reflection registered for ``service_names`` (full proto
    names, e.g. ``qwen3serve.engine.v1.EngineService``) and RPC metrics for them.

    Every service, and the server as a whole (""), starts NOT_SERVING: call :func:`set_serving`
    once ready. Add the servicers, then :func:`bind`, then ``await server.start()``.
    """
    config = config or ServerConfig()
    if not service_names:
        raise ValueError("service_names must name at least one service")
    server = grpc.aio.server(
        # Metrics outermost: UNAUTHENTICATED answers are counted too.
        interceptors=[RpcMetricsInterceptor(service_names), *config.security.interceptors(), *interceptors],
        options=config.channel_options(),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server,
                                        pool=_ReflectionPool(descriptor_pool.Default()))
    # The aio HealthServicer starts "" as SERVING; nothing is ready yet. set() is async, but touching
    # the status map directly here keeps build_server usable before the event loop runs.
    for name in ("", *service_names):
        health._server_status[name] = health_pb2.HealthCheckResponse.NOT_SERVING
    return server, health


async def set_serving(health: health_aio.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    """Mark ``service_names`` and the whole server ("") SERVING or NOT_SERVING (ignored after shutdown began)."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *service_names):
        await health.set(name, status)


def bind(server: grpc.aio.Server, host: str = "127.0.0.1", port: int = 0,
         security: ServerSecurity | None = None) -> int:
    """Listen on ``host:port``, with TLS when ``security.tls`` is set; port 0 picks a free port.
    Returns the bound port. Warns (once) when a non-loopback host gets neither TLS nor an API key.

    Raises OSError naming the address when it cannot be bound (in use, bad host).
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    tls = security.tls if security is not None else None
    try:
        bound = (server.add_insecure_port(address) if tls is None
                 else server.add_secure_port(address, tls.credentials()))
    except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind to address ...")
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    warn_if_exposed(host, security)
    return bound


async def serve_until_signal(server: grpc.aio.Server, health: health_aio.HealthServicer,
                             grace_s: float = 10.0,
                             signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Run a started server until one of ``signals`` arrives (or the server stops by itself), then
    shut down gracefully: health turns NOT_SERVING for every service (load balancers stop sending),
    new RPCs are refused, running ones get ``grace_s`` seconds to finish before being cancelled.
    The caller releases its own resources (engine, channels) after this returns.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    stop_waiter = asyncio.ensure_future(stop.wait())
    # Never cancelled: grpc's wait_for_termination awaits the server's own shutdown future, and
    # cancelling it would cancel that future and make server.stop() below raise CancelledError.
    termination = asyncio.ensure_future(server.wait_for_termination())
    try:
        await asyncio.wait({stop_waiter, termination}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        stop_waiter.cancel()
    log.info("shutting down", extra={"signal": received[0] if received else "none", "grace_s": grace_s})
    await health.enter_graceful_shutdown()
    await server.stop(grace_s)
    await termination
    log.info("stopped")
