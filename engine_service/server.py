"""The EngineService gRPC servicer: token ids in, streamed token ids out.

Handlers only translate: protobuf <-> ``SamplingParams`` / ``RequestOutput``, domain errors <->
status codes (``service_common.errors``, one table for both services). The work happens on the
engine process (or thread) behind ``AsyncEngine``; nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc.aio

from engine_service.async_engine import AsyncEngine, RequestIdInUseError
from engine_service.config import EngineConfig
from engine_service.core.engine_loop import validate_stream_interval
from engine_service.generate_request import generate_inputs, request_path
from engine_service.limits import ENGINE_MAX_MESSAGE_BYTES, RequestLimits, check_cache_salt, check_request_id
from engine_service.metrics import EngineMetrics
from engine_service.protocol import (
    EmbeddingOutput,
    EngineDeadError,
    EngineOverloadedError,
    FinishReason,
    RequestOutput,
    TokenLogprob,
    check_lengths,
)
from engine_service.vllm_grpc.servicer import SERVICE_NAME as VLLM_SERVICE_NAME
from engine_service.vllm_grpc.servicer import add_vllm_servicer
from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from service_common.errors import AlreadyExists, Overloaded, Unavailable, handle_errors
from service_common.logging import bind_request_id
from service_common.server import ServerConfig, bind, build_server, set_serving
from service_common.validation import FieldError

if TYPE_CHECKING:
    from grpc_health.v1.health import aio as health_aio

    from engine_service.core.engine import LLMEngine

log = logging.getLogger(__name__)

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name

_FINISH_REASONS = {
    FinishReason.STOP: engine_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: engine_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORTED: engine_pb2.FINISH_REASON_ABORTED,
    FinishReason.ERROR: engine_pb2.FINISH_REASON_ERROR,
}


def token_logprob_pb(lp: TokenLogprob) -> engine_pb2.TokenLogprob:
    return engine_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_logprobs=[engine_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


class EngineServicer(engine_pb2_grpc.EngineServiceServicer):
    def __init__(
        self,
        model_name: str,
        model_path: str,
        metrics: EngineMetrics | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_path = model_path
        self.metrics = metrics or EngineMetrics(model_name)
        self.limits = limits or RequestLimits()
        self.engine: AsyncEngine | None = None  # set once loaded; until then requests are UNAVAILABLE

    def attach(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def _live_engine(self) -> AsyncEngine:
        if self.engine is None:
            raise Unavailable("the engine is still loading")
        if self.engine.dead_reason:
            raise Unavailable(f"the engine is down: {self.engine.dead_reason}")
        return self.engine

    def _response(self, request_id: str, out: RequestOutput) -> engine_pb2.GenerateResponse:
        response = engine_pb2.GenerateResponse(request_id=request_id, token_ids=out.new_token_ids, index=out.index)
        if out.new_logprobs:
            response.logprobs.extend(token_logprob_pb(lp) for lp in out.new_logprobs)
        if out.prompt_logprobs:
            response.prompt_logprobs.extend(token_logprob_pb(lp) for lp in out.prompt_logprobs)
        if out.finished:
            response.finish_reason = _FINISH_REASONS[out.finish_reason or FinishReason.ERROR]
            response.usage.prompt_tokens = out.num_prompt_tokens
            response.usage.completion_tokens = out.num_output_tokens
            response.usage.cached_prompt_tokens = out.num_cached_tokens
        return response

    # ---- RPCs -----------------------------------------------------------------------------------
    @handle_errors
    async def Generate(
        self, request: engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        check_request_id(request.request_id, self.limits)
        check_cache_salt(request.cache_salt, self.limits)
        labelled = bool(request.request_id)
        request_id = request.request_id or uuid.uuid4().hex
        bind_request_id(request_id)
        engine = self._live_engine()
        prompt_token_ids, params = generate_inputs(request, engine.info, self.limits)
        start = last = time.perf_counter()
        first = True
        try:
            async for out in engine.generate(
                prompt_token_ids, params, request_id if labelled else None, request.priority, request.cache_salt
            ):
                now = time.perf_counter()
                if n := len(out.new_token_ids):
                    self.metrics.generation_tokens.inc(n)
                    if first:
                        self.metrics.time_to_first_token.observe(now - start)
                        first = False
                    else:
                        # n tokens in one message (stream interval, or a backlog folded): the gap is theirs
                        for _ in range(n):
                            self.metrics.inter_token_latency.observe((now - last) / n)
                    last = now
                if out.finished:
                    self.metrics.e2e_request_latency.observe(now - start)
                    if out.index == 0:  # the samples share one prompt
                        self.metrics.prompt_tokens.inc(out.num_prompt_tokens)
                    if out.queue_time is not None:
                        self.metrics.request_queue_time.observe(out.queue_time)
                    self.metrics.finished((out.finish_reason or FinishReason.ERROR).value)
                yield self._response(request_id, out)
        except FieldError as exc:
            raise request_path(exc) from None
        except RequestIdInUseError as exc:
            raise AlreadyExists(str(exc)) from exc
        except EngineOverloadedError as exc:
            raise Overloaded(str(exc)) from exc
        except EngineDeadError as exc:
            raise Unavailable(f"the engine is down: {exc}") from exc

    @handle_errors
    async def Embed(
        self, request: engine_pb2.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> engine_pb2.EmbedResponse:
        check_request_id(request.request_id, self.limits)
        request_id = request.request_id or uuid.uuid4().hex
        bind_request_id(request_id)
        normalize = request.normalize if request.HasField("normalize") else None
        result = await self.embed(request.prompt_token_ids, normalize)
        return engine_pb2.EmbedResponse(
            request_id=request_id, embedding=result.embedding, prompt_tokens=result.num_prompt_tokens
        )

    async def embed(self, prompt_token_ids: Sequence[int], normalize: bool | None) -> EmbeddingOutput:
        """Both APIs' Embed: the engine's result, or the domain error its failure maps to (FieldError names
        ``prompt_token_ids``; the caller renames it to its own field). The length rule is checked before the
        ids are copied out of the request."""
        engine = self._live_engine()
        check_lengths(len(prompt_token_ids), None, engine.info.max_model_len)
        start = time.perf_counter()
        try:
            result = await engine.embed(list(prompt_token_ids), normalize)
        except EngineOverloadedError as exc:
            raise Overloaded(str(exc)) from exc
        except EngineDeadError as exc:
            raise Unavailable(f"the engine is down: {exc}") from exc
        self.metrics.e2e_request_latency.observe(time.perf_counter() - start)
        self.metrics.prompt_tokens.inc(result.num_prompt_tokens)
        return result

    @handle_errors
    async def Abort(
        self, request: engine_pb2.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> engine_pb2.AbortResponse:
        check_request_id(request.request_id, self.limits)
        bind_request_id(request.request_id)
        if not request.request_id:
            raise FieldError("request_id", "must not be empty")
        # Unknown or already ended is not an error (Abort is idempotent): aborted=false, as the proto says;
        # an index past the live request's n is (FieldError on `index`).
        index = request.index if request.HasField("index") else None
        return engine_pb2.AbortResponse(aborted=await self._live_engine().abort(request.request_id, index))

    @handle_errors
    async def GetModelInfo(
        self, request: engine_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> engine_pb2.GetModelInfoResponse:
        info = self._live_engine().info
        return engine_pb2.GetModelInfoResponse(
            model_name=self.model_name,
            model_path=self.model_path,
            vocab_size=info.vocab_size,
            max_model_len=info.max_model_len,
            eos_token_ids=list(info.eos_token_ids),
            dtype=info.dtype,
            tensor_parallel_size=info.tensor_parallel_size,
            kv_block_size=info.kv_block_size,
            num_kv_blocks=info.num_kv_blocks,
            attention_backend=info.attention_backend,
        )

    @handle_errors
    async def GetLoad(
        self, request: engine_pb2.GetLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> engine_pb2.GetLoadResponse:
        engine = self._live_engine()
        stats = engine.stats
        return engine_pb2.GetLoadResponse(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_cache_usage=stats.kv_cache_usage,
            max_waiting=engine.info.max_waiting_requests,
        )


@dataclass
class EngineServer:
    """A running engine server: the gRPC server, its health servicer, the servicer and the bound port."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    servicer: EngineServicer
    port: int
    _load_task: asyncio.Task[None] | None = None
    _metrics_task: asyncio.Task[None] | None = None
    _death_task: asyncio.Task[None] | None = None  # held: the loop keeps only weak references to tasks
    died: asyncio.Event = field(default_factory=asyncio.Event)  # set when the engine dies (not on stop)

    async def abort_all(self) -> None:
        """End every running stream with a final ABORTED message (the end of a graceful shutdown)."""
        if self.servicer.engine is not None:
            self.servicer.engine.abort_all()

    async def wait_until_ready(self) -> None:
        if self._load_task is not None:
            await self._load_task

    async def stop(self, grace_s: float | None = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        for task in (self._load_task, self._metrics_task):
            if task is not None and not task.done():
                task.cancel()
        if self.servicer.engine is not None:
            await self.servicer.engine.stop()


async def start_engine_server(
    engine: EngineConfig | Callable[[], LLMEngine],
    model_path: str,
    *,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    config: ServerConfig | None = None,
    log_level: str = "INFO",
    log_format: str = "kv",
    stream_interval: int = 1,
    limits: RequestLimits | None = None,
) -> EngineServer:
    """Start serving at once (health NOT_SERVING, requests UNAVAILABLE) and load the engine meanwhile.

    ``engine`` is an ``EngineConfig``, loaded and run in a child process (what the CLI does: the GPU
    loop then never shares this process's interpreter lock with gRPC; ``log_level``/``log_format`` set
    up its logs), or a zero-argument callable returning an ``LLMEngine``, run off the event loop and
    then driven from a thread of this process (tests, embedding). Health turns SERVING once it is
    loaded, and NOT_SERVING for good if the engine dies. ``stream_interval`` N > 1 streams each
    request's tokens N per message (the first token and the final message at once).
    """
    validate_stream_interval(stream_interval)
    name = model_name or Path(model_path).name
    servicer = EngineServicer(name, str(model_path), limits=limits)
    config = config or ServerConfig(max_message_bytes=ENGINE_MAX_MESSAGE_BYTES)
    server, health = build_server([SERVICE_NAME, VLLM_SERVICE_NAME], config)
    engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, server)
    add_vllm_servicer(servicer, server)  # SMG's worker contract, same engine, same port
    bound = bind(server, host, port, config.security if config is not None else None)
    await server.start()
    running = EngineServer(server, health, servicer, bound)

    async def on_death(reason: str) -> None:
        log.error("engine died; health NOT_SERVING", extra={"reason": reason})
        await set_serving(health, [SERVICE_NAME, VLLM_SERVICE_NAME], False)
        running.died.set()

    async def load() -> None:
        try:
            if isinstance(engine, EngineConfig):
                driven = await asyncio.to_thread(AsyncEngine.in_process, engine, log_level, log_format, stream_interval)
            else:
                driven = AsyncEngine.in_thread(await asyncio.to_thread(engine), stream_interval)
        except Exception:
            log.exception("engine failed to load")
            raise

        def report_death(reason: str) -> None:  # called on the event loop by AsyncEngine
            running._death_task = asyncio.ensure_future(on_death(reason))

        driven.on_death = report_death
        driven.start()
        servicer.attach(driven)
        await set_serving(health, [SERVICE_NAME, VLLM_SERVICE_NAME], True)
        log.info("serving", extra={"model": name, "port": bound})

    async def publish_load() -> None:
        while True:
            if servicer.engine is not None:
                servicer.metrics.update_load(servicer.engine.stats)
            await asyncio.sleep(1.0)

    running._load_task = asyncio.ensure_future(load())
    running._metrics_task = asyncio.ensure_future(publish_load())
    return running
