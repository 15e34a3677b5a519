"""The tokenizer service's link to its engine: the gRPC channel (limits, keepalive, TLS, API key), the
health probe that keeps this server SERVING only while the engine is, and the fire-and-forget aborts of
single samples (``SampleAborts``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from service_common.security import ChannelSecurity, aio_channel
from service_common.server import ServerConfig, set_serving

log = logging.getLogger(__name__)

ENGINE_SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name


class EngineHealthProbe:
    """Keeps this server's health in step with the engine's: SERVING only while the engine's health
    service answers SERVING for EngineService. Status changes are logged once, not every probe."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        health: health_aio.HealthServicer,
        service_names: Sequence[str],
        interval_s: float = 2.0,
        timeout_s: float = 1.0,
        on_serving: Callable[[], None] | None = None,
    ) -> None:
        self._on_serving = on_serving  # called each time the engine turns SERVING (it may have restarted)
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._health = health
        self._service_names = tuple(service_names)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        self.engine_serving: bool | None = None  # None until the first probe

    async def check_once(self) -> bool:
        """Probe the engine once and update this server's health; returns whether the engine serves."""
        try:
            # types-grpcio-health-checking declares HealthStub without its methods.
            response: health_pb2.HealthCheckResponse = await self._stub.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=ENGINE_SERVICE_NAME), timeout=self._timeout_s
            )
            serving, why = (
                response.status == health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.ServingStatus.Name(response.status),
            )
        except grpc.aio.AioRpcError as exc:
            serving, why = False, f"{exc.code().name}: {exc.details()}"
        if serving != self.engine_serving:
            (log.info if serving else log.warning)("engine health changed", extra={"engine": why, "serving": serving})
            await set_serving(self._health, self._service_names, serving)
            self.engine_serving = serving
            if serving and self._on_serving is not None:
                self._on_serving()
        return serving

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-health-probe")
        self._task.add_done_callback(self._log_failure)

    async def stop(self) -> None:
        """Stop probing (before a graceful shutdown). Re-raises a failure of the probe task."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})  # waits without raising: the task's own outcome is checked below
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    @staticmethod
    def _log_failure(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("engine health probe died; health stays as it was", exc_info=task.exception())

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval_s)


class SampleAborts:
    """Aborts one sample of a running n > 1 request in the engine (its stop string matched here), without
    waiting: the stream goes on at once, the Abort runs in its own task with a short deadline, and a failure
    is only logged (the sample's tokens are dropped here anyway; it ends with its siblings at the latest)."""

    def __init__(self, engine: engine_pb2_grpc.EngineServiceAsyncStub, timeout_s: float = 1.0) -> None:
        self._engine = engine
        self._timeout_s = timeout_s
        self._pending: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones

    def send(self, request_id: str, index: int) -> None:
        task = asyncio.create_task(self._abort(request_id, index), name=f"abort-sample-{index}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _abort(self, request_id: str, index: int) -> None:
        try:
            await self._engine.Abort(
                engine_pb2.AbortRequest(request_id=request_id, index=index), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "could not abort a sample ended by its stop string; it runs until its siblings end",
                extra={"index": index, "error": exc.code().name},
            )


def engine_channel(
    target: str, server_config: ServerConfig | None = None, security: ChannelSecurity | None = None
) -> grpc.aio.Channel:
    """The channel to the engine: message limits matching the server's, keepalive on long streams,
    TLS and the engine's API key per ``security`` (the health probe shares it)."""
    config = server_config or ServerConfig()
    return aio_channel(
        target,
        security=security,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # At least the engine server's min_client_ping_interval_s, or it would answer too_many_pings.
            ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ],
    )
