"""``vllm.grpc.engine.VllmEngine``, the worker contract the SMG gateway speaks, served by our engine.

It runs on the same server and port as ``qwen3serve.engine.v1.EngineService`` and shares its engine, its
metrics, its limits and its error mapping (``service_common.errors``): it is a second front onto the same
``AsyncEngine``, so a request from SMG and one from our tokenizer service are scheduled together, and an
Abort from either names the same live requests. No torch here.

Generate's reply: with ``stream`` set, one ``chunk`` per delta (the last delta's tokens too) and then a
``complete`` without tokens (SMG 1.13 takes a streamed request's tokens from its chunks only: tokens in the
final ``complete`` were dropped from the text and the usage); without it, one ``complete`` with all tokens.
With ``n > 1`` every chunk and every ``complete`` carries its sample's ``index`` (SMG's fields for it), the
samples' chunks interleave, and each sample ends with its own ``complete`` (n in all), as vLLM's own gRPC
server answers. A stop string ends its own sample only (``AsyncEngine.abort_sample``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc.aio
import tokenizers

from engine_service.limits import check_request_id
from engine_service.protocol import EngineDeadError, FinishReason, RequestOutput, TokenLogprob
from engine_service.vllm_grpc.kv_events import KvEventStreams
from engine_service.vllm_grpc.requests import EngineRequest, engine_request, prompt_field
from engine_service.vllm_grpc.stops import StopHit, StopWatch
from engine_service.vllm_grpc.tokenizer_files import tokenizer_chunks
from qwen3serve.smg import common_pb2
from qwen3serve.smg import vllm_engine_pb2 as pb
from qwen3serve.smg import vllm_engine_pb2_grpc as pb_grpc
from service_common.errors import Unavailable, handle_errors
from service_common.logging import bind_request_id
from service_common.validation import FieldError

if TYPE_CHECKING:
    from engine_service.server import EngineServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VllmEngine"].full_name

_FINISH_REASONS = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORTED: "abort",
    FinishReason.ERROR: "error",
}


def _input_logprobs(prompt: list[int], items: list[TokenLogprob]) -> pb.InputLogProbs:
    """SMG's prompt logprobs: one entry per prompt token, the first without a value (nothing precedes it)."""
    return pb.InputLogProbs(
        token_logprobs=[pb.InputTokenLogProb(), *(pb.InputTokenLogProb(value=lp.logprob) for lp in items)],
        token_ids=prompt[:1] + [lp.token_id for lp in items],
        top_logprobs=[
            pb.TopLogProbs(),
            *(pb.TopLogProbs(values=[v for _, v in lp.top], token_ids=[t for t, _ in lp.top]) for lp in items),
        ],
    )


def _logprobs(items: list[TokenLogprob]) -> pb.OutputLogProbs:
    return pb.OutputLogProbs(
        token_logprobs=[lp.logprob for lp in items],
        token_ids=[lp.token_id for lp in items],
        top_logprobs=[pb.TopLogProbs(values=[v for _, v in lp.top], token_ids=[t for t, _ in lp.top]) for lp in items],
    )


@dataclass
class _Sample:
    """One sample's state in a Generate call."""

    watch: StopWatch | None  # its own stop-string matcher (None: no stop strings)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False  # its complete was sent


class VllmEngineServicer(pb_grpc.VllmEngineServicer):
    """The SMG worker RPCs over the engine that ``base`` (the EngineService servicer) holds."""

    def __init__(self, base: EngineServicer) -> None:
        self.base = base
        self.started = time.time()
        self.last_receive = 0.0
        self.kv_events = KvEventStreams(base)
        self._tokenizer: tokenizers.Tokenizer | None = None

    @property
    def model_dir(self) -> Path:
        return Path(self.base.model_path)

    def tokenizer(self) -> tokenizers.Tokenizer:
        """The checkpoint's tokenizer, loaded on the first request with stop strings."""
        if self._tokenizer is None:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        return self._tokenizer

    # ---- Generate -------------------------------------------------------------------------------
    @handle_errors
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.last_receive = time.time()
        bind_request_id(request.request_id)
        engine = self.base._live_engine()
        req = engine_request(request, engine.info, self.base.limits)
        tokenizer = await asyncio.to_thread(self.tokenizer) if req.stop else None

        def new_watch() -> StopWatch | None:
            if tokenizer is None:
                return None
            return StopWatch(tokenizer, req.stop, req.params.min_tokens, req.skip_special_tokens)

        async for response in self._generate(req, new_watch):
            yield response

    async def _generate(
        self, req: EngineRequest, new_watch: Callable[[], StopWatch | None]
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The engine's deltas as SMG's messages, per sample. A stop string ends its sample (the engine
        aborts that sample only); leaving early (client cancel) closes the engine stream, which aborts
        every sample in the scheduler."""
        engine = self.base._live_engine()
        samples = [_Sample(new_watch()) for _ in range(req.params.n)]
        unfinished = req.params.n
        prompt = len(req.prompt_token_ids)
        input_logprobs: pb.InputLogProbs | None = None  # the prompt's, from sample 0's first delta
        # SMG's GenerateRequest has no priority field: its requests run at the default priority, 0
        stream = engine.generate(req.prompt_token_ids, req.params, req.request_id)
        try:
            async for out in stream:
                sample = samples[out.index]
                if sample.done:  # its stop string matched: the engine's late tokens and ABORTED end are dropped
                    continue
                hit = sample.watch.push(out.new_token_ids) if sample.watch is not None else None
                if hit is not None:
                    self._cut(out, hit, prompt, len(sample.tokens))
                    if unfinished > 1:
                        engine.abort_sample(out.request_id, out.index)
                sample.tokens += out.new_token_ids
                sample.logprobs += out.new_logprobs or []
                first_input_logprobs = None
                if out.prompt_logprobs is not None:
                    first_input_logprobs = input_logprobs = _input_logprobs(req.prompt_token_ids, out.prompt_logprobs)
                if req.stream and out.new_token_ids:
                    yield pb.GenerateResponse(
                        chunk=pb.GenerateStreamChunk(
                            token_ids=out.new_token_ids,
                            prompt_tokens=prompt,
                            completion_tokens=len(sample.tokens),
                            output_logprobs=_logprobs(out.new_logprobs) if out.new_logprobs else None,
                            input_logprobs=first_input_logprobs,  # the first chunk only
                            index=out.index,
                        )
                    )
                if out.finished:
                    sample.done = True
                    complete = self._complete(req, out, sample.tokens, sample.logprobs, hit)
                    if input_logprobs is not None and not req.stream:
                        complete.complete.input_logprobs.CopyFrom(input_logprobs)
                    yield complete
                    unfinished -= 1
                    if not unfinished:
                        return
        except FieldError as exc:  # from the engine: a constraint that does not compile names a SamplingParams field
            raise exc.within("sampling_params") from None
        finally:
            await stream.aclose()  # at once, not at garbage collection: the abort reaches the engine now

    @staticmethod
    def _cut(out: RequestOutput, hit: StopHit, prompt: int, before: int) -> None:
        """End ``out`` at the token that completed a stop string (the engine request is aborted after)."""
        del out.new_token_ids[hit.keep :]
        if out.new_logprobs:
            del out.new_logprobs[hit.keep :]
        out.finished, out.finish_reason = True, FinishReason.STOP
        # the prefix-cache hit comes only with the engine's final delta, which a stop string pre-empts: 0 here
        out.num_prompt_tokens, out.num_output_tokens = prompt, before + hit.keep

    def _complete(
        self,
        req: EngineRequest,
        out: RequestOutput,
        tokens: list[int],
        logprobs: list[TokenLogprob],
        hit: StopHit | None,
    ) -> pb.GenerateResponse:
        reason = out.finish_reason or FinishReason.ERROR
        complete = pb.GenerateComplete(
            output_ids=[] if req.stream else tokens,
            finish_reason=_FINISH_REASONS[reason],
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=out.num_output_tokens,
            cached_tokens=out.num_cached_tokens,
            index=out.index,
        )
        if req.params.logprobs is not None and logprobs and not req.stream:
            complete.output_logprobs.CopyFrom(_logprobs(logprobs))
        if hit is not None:
            complete.matched_stop_str = hit.stop
        elif reason is FinishReason.STOP and tokens and tokens[-1] in req.params.stop_token_ids:
            complete.matched_token_id = tokens[-1]
        self.base.metrics.finished(reason.value)
        return pb.GenerateResponse(complete=complete)

    # ---- Embed ------------------------------------------------------------------------------------
    @handle_errors
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.EmbedResponse:
        """Last-token pooled, normalised as the checkpoint says (``engine_service.pooling``): the same engine
        path as EngineService.Embed. Only token ids (``tokenized.input_ids``) are taken."""
        self.last_receive = time.time()
        check_request_id(request.request_id, self.base.limits)
        bind_request_id(request.request_id)
        try:
            result = await self.base.embed(list(request.tokenized.input_ids), None)
        except FieldError as exc:
            raise prompt_field(exc) from None
        return pb.EmbedResponse(
            embedding=result.embedding, prompt_tokens=result.num_prompt_tokens, embedding_dim=len(result.embedding)
        )

    # ---- the rest ---------------------------------------------------------------------------------
    @handle_errors
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.AbortResponse:
        engine = self.base._live_engine()
        for request_id in request.request_ids:  # unknown or ended ids are not an error: Abort is idempotent
            await engine.abort(request_id)
        return pb.AbortResponse()

    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HealthCheckResponse:
        engine = self.base.engine
        if engine is None:
            return pb.HealthCheckResponse(healthy=False, message="the engine is still loading")
        if engine.dead_reason:
            return pb.HealthCheckResponse(healthy=False, message=f"the engine is down: {engine.dead_reason}")
        return pb.HealthCheckResponse(healthy=True, message="ok")

    @handle_errors
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelInfoResponse:
        info = self.base._live_engine().info
        return pb.GetModelInfoResponse(
            model_path=str(self.model_dir.resolve()),
            is_generation=True,
            max_context_length=info.max_model_len,
            vocab_size=info.vocab_size,
            supports_vision=False,
            served_model_name=self.base.model_name,
            tokenizer_path=str(self.model_dir.resolve()),
            model_type="qwen3",
            architectures=["Qwen3ForCausalLM"],
            eos_token_ids=list(info.eos_token_ids),
            max_req_input_len=info.max_model_len - 1,
        )

    @handle_errors
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetServerInfoResponse:
        engine = self.base._live_engine()
        stats, info = engine.stats, engine.info
        return pb.GetServerInfoResponse(
            active_requests=stats.num_running + stats.num_waiting,
            is_paused=False,
            last_receive_timestamp=self.last_receive,
            uptime_seconds=time.time() - self.started,
            server_type="vllm-grpc",
            data_parallel_size=1,
            block_size=info.kv_block_size,
            attention_backend=info.attention_backend,
            model_dtype=info.dtype,
            # Where the prompt leaves Qwen3 thinking open, a grammar starts after </think>
            # (engine_service.core.structured_output); grammar_from_first_token starts it at once.
            constrained_decoding_start="after_reasoning",
        )

    @handle_errors
    async def GetLoads(
        self, request: pb.GetLoadsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetLoadsResponse:
        engine = self.base._live_engine()
        stats = engine.stats
        load = pb.SchedulerLoad(
            dp_rank=0,
            num_running_reqs=stats.num_running,
            num_waiting_reqs=stats.num_waiting,
            num_total_reqs=stats.num_running + stats.num_waiting,
            token_usage=stats.kv_cache_usage,
            cache_hit_rate=stats.prefix_cache_hit_rate,
            max_total_num_tokens=engine.info.num_kv_blocks * engine.info.kv_block_size,
        )
        return pb.GetLoadsResponse(
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            version="qwen3-serve",
            dp_rank_count=1,
            loads=[load],
        )

    @handle_errors
    async def GetTokenizer(
        self, request: common_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        for chunk in await asyncio.to_thread(tokenizer_chunks, self.model_dir):
            yield chunk

    @handle_errors
    async def SubscribeKvEvents(
        self, request: common_pb2.SubscribeKvEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[common_pb2.KvEventBatch]:
        await context.send_initial_metadata(())  # headers at once: SMG counts a silent stream as unreachable
        async for batch in self.kv_events.subscribe(request):
            yield batch

    @handle_errors
    async def FlushCache(
        self, request: common_pb2.FlushCacheRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.FlushCacheResponse:
        """Drop every cached block that no running request holds, at once (``timeout_s`` is not needed: blocks
        in use stay cached, so nothing waits for the engine to go idle). Subscribers get ``cleared`` and the
        blocks still cached."""
        try:
            flushed = await self.base._live_engine().prefix_cache.flush()
        except EngineDeadError as exc:
            raise Unavailable(f"the engine is down: {exc}") from exc
        return common_pb2.FlushCacheResponse(
            success=True,
            message=f"dropped {flushed.dropped} cached blocks; kept {flushed.kept} held by running requests",
        )


def add_vllm_servicer(base: EngineServicer, server: grpc.aio.Server) -> VllmEngineServicer:
    """Serve ``vllm.grpc.engine.VllmEngine`` on ``server`` over ``base``'s engine."""
    servicer = VllmEngineServicer(base)  # type: ignore[abstract]  # RPCs it leaves to the base answer UNIMPLEMENTED
    pb_grpc.add_VllmEngineServicer_to_server(servicer, server)
    return servicer
