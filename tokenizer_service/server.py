"""The TokenizerService servicer: text in, text out, with the engine's Generate behind Chat/Complete.

One generation request, in order: limits (:mod:`tokenizer_service.limits`: counts and sizes, before
any per-item work) -> convert, render (chat template) and tokenize in a worker thread (the tokenizer
releases the GIL there, so the event loop keeps serving) -> the prompt's length against the engine's
``max_model_len`` ->
``EngineService.Generate`` with the caller's remaining deadline -> for every engine message:
incremental detokenization -> stop-string hold-back -> (Chat) reasoning split -> (Chat with tools)
tool-call parsing -> a response message when there is new text. A matched stop string, a client cancel or a deadline
cancels the engine call, which makes the engine abort the request and free its KV cache.

With ``sampling_params.n > 1`` each sample goes through that text path on its own (``samples.py``) and its
messages carry its ``index``; a stop string ends its own sample, and the engine call is cancelled once
every sample has ended. A sample ended by its stop string while its siblings go on is aborted in the engine
by ``Abort(request_id, index)`` (fire-and-forget, ``engine_link.SampleAborts``), so it stops taking decode
slots and frees its KV blocks; its tokens generated before the abort lands, and its ABORTED end, are dropped
here (its usage counts the tokens up to the stop string).

The service reports NOT_SERVING while the engine's health service does not answer SERVING
(:class:`EngineHealthProbe`), so load balancers send no traffic to a tokenizer with a dead engine.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1.health import aio as health_aio

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from service_common.errors import InvalidArgument, ServiceError, from_rpc_error, handle_errors
from service_common.logging import bind_request_id
from service_common.security import ChannelSecurity
from service_common.server import ServerConfig, bind, build_server
from tokenizer_service.chat_template import ChatTokenizer
from tokenizer_service.config import RequestLimits
from tokenizer_service.conversation import messages_to_dicts, tools_to_dicts
from tokenizer_service.engine_link import EngineHealthProbe, SampleAborts, engine_channel
from tokenizer_service.limits import check_conversation, check_request_id, check_stop_strings, check_text
from tokenizer_service.output_format import chat_fields, chat_generation
from tokenizer_service.reasoning import prompt_opens_thinking
from tokenizer_service.samples import ChatSample, SampleText, TextDelta

log = logging.getLogger(__name__)

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name


def _check_text_generation(
    request: tokenizer_pb2.ChatRequest | tokenizer_pb2.CompleteRequest, limits: RequestLimits
) -> None:
    """What Chat and Complete share: request_id and stop strings within the limits, no logprobs, a
    truncate_prompt_tokens of at least 1 (the prompt is truncated here, before its length is checked)."""
    check_request_id(request.request_id, limits)
    check_stop_strings(request.stop, limits)
    sampling = request.sampling_params
    if sampling.HasField("logprobs"):
        raise InvalidArgument(
            "sampling_params.logprobs", "token log-probabilities are served by EngineService.Generate only"
        )
    if sampling.HasField("truncate_prompt_tokens") and sampling.truncate_prompt_tokens < 1:
        raise InvalidArgument(
            "sampling_params.truncate_prompt_tokens", f"must be >= 1, got {sampling.truncate_prompt_tokens}"
        )


def _truncated(prompt_ids: list[int], sampling: engine_pb2.SamplingParams) -> list[int]:
    """The prompt the engine will see: its last ``truncate_prompt_tokens`` ids when set (the engine truncates
    the same way; doing it here first makes the length check and usage agree with it)."""
    return prompt_ids[-sampling.truncate_prompt_tokens :] if sampling.HasField("truncate_prompt_tokens") else prompt_ids


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    """Serves TokenizerService with ``tokenizer``, generating through ``engine`` (an EngineService stub);
    every request is held to ``limits`` before any other work."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        engine: engine_pb2_grpc.EngineServiceAsyncStub,
        limits: RequestLimits | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._engine = engine
        self._limits = limits or RequestLimits()
        self._max_model_len: int | None = None  # the engine's, once asked (forget_model_info resets it)
        self._live: set[str] = set()  # request ids of the engine streams open now
        self._sample_aborts = SampleAborts(engine)  # one sample of n > 1 ended here by its stop string

    def forget_model_info(self) -> None:
        """The engine (re)started: ask for its max_model_len again before the next prompt."""
        self._max_model_len = None

    def _render(
        self,
        messages: Sequence[tokenizer_pb2.ChatMessage],
        tools: Sequence[tokenizer_pb2.Tool],
        add_generation_prompt: bool,
        enable_thinking: bool | None,
    ) -> tuple[str, list[int]]:
        """Convert, render and tokenize a conversation (in a worker thread: parsing and rendering are
        linear in the request's size, bounded by the limits checked before)."""
        return self._tokenizer.apply_chat_template(
            messages_to_dicts(messages, self._limits),
            tools_to_dicts(tools, self._limits),
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )

    async def _check_prompt_length(self, prompt_ids: Sequence[int], field: str) -> None:
        """InvalidArgument on ``field`` if the prompt leaves no room for one generated token. Asks the
        engine's GetModelInfo once; if that fails, the engine's own check decides (see _generate)."""
        if self._max_model_len is None:
            try:
                info = await self._engine.GetModelInfo(engine_pb2.GetModelInfoRequest(), timeout=2.0)
            except grpc.aio.AioRpcError as exc:
                log.debug(
                    "GetModelInfo failed; the engine checks the prompt's length itself", extra={"code": exc.code().name}
                )
                return
            self._max_model_len = info.max_model_len
        if len(prompt_ids) >= self._max_model_len:
            raise InvalidArgument(
                field,
                f"the prompt has {len(prompt_ids)} tokens; the model's maximum length "
                f"is {self._max_model_len} tokens, including at least one generated token",
            )

    async def abort_all(self) -> None:
        """Abort every open generation in the engine (the end of a graceful shutdown): each stream then
        ends with the engine's final ABORTED message, passed on as this service's final message."""
        ids = list(self._live)
        results = await asyncio.gather(
            *(self._engine.Abort(engine_pb2.AbortRequest(request_id=rid), timeout=2) for rid in ids),
            return_exceptions=True,
        )
        failed = [(rid, r) for rid, r in zip(ids, results) if isinstance(r, grpc.aio.AioRpcError)]
        if failed:  # e.g. the engine is shutting down too: it aborts them itself at the end of its grace period
            log.warning(
                "could not abort some engine streams", extra={"count": len(failed), "error": failed[0][1].code().name}
            )

    # ---- unary ------------------------------------------------------------------------------
    @handle_errors
    async def Tokenize(
        self, request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tokenizer_pb2.TokenizeResponse:
        check_text("text", request.text, self._limits)
        ids = await asyncio.to_thread(self._tokenizer.encode, request.text, request.add_special_tokens)
        return tokenizer_pb2.TokenizeResponse(token_ids=ids)

    @handle_errors
    async def Detokenize(
        self, request: tokenizer_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tokenizer_pb2.DetokenizeResponse:
        text = await asyncio.to_thread(self._tokenizer.decode, request.token_ids, request.skip_special_tokens)
        return tokenizer_pb2.DetokenizeResponse(text=text)

    @handle_errors
    async def ApplyChatTemplate(
        self, request: tokenizer_pb2.ApplyChatTemplateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tokenizer_pb2.ApplyChatTemplateResponse:
        check_conversation(request.messages, request.tools, self._limits)
        prompt, ids = await asyncio.to_thread(
            self._render,
            request.messages,
            request.tools,
            request.add_generation_prompt,
            request.enable_thinking if request.HasField("enable_thinking") else None,
        )
        return tokenizer_pb2.ApplyChatTemplateResponse(prompt=prompt, prompt_token_ids=ids)

    # ---- streaming --------------------------------------------------------------------------
    @handle_errors
    async def Chat(
        self, request: tokenizer_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[tokenizer_pb2.ChatResponse]:
        _check_text_generation(request, self._limits)  # before the id is logged: it may be too long
        if request.sampling_params.HasField("prompt_logprobs"):  # ChatResponse has no field to carry them
            raise InvalidArgument(
                "sampling_params.prompt_logprobs", "prompt log-probabilities are served by Complete and Generate only"
            )
        request_id = request.request_id or uuid.uuid4().hex
        bind_request_id(request_id)
        check_conversation(request.messages, request.tools, self._limits)
        # response_format / tool_choice -> the engine's constraint (output_format.py); "none" hides the tools
        sampling, tools = await asyncio.to_thread(chat_generation, request, self._limits)
        thinking = request.enable_thinking if request.HasField("enable_thinking") else None
        prompt, prompt_ids = await asyncio.to_thread(self._render, request.messages, tools, True, thinking)
        prompt_ids = _truncated(prompt_ids, sampling)
        await self._check_prompt_length(prompt_ids, "messages")
        starts_in_reasoning = prompt_opens_thinking(prompt)
        samples: dict[int, ChatSample] = {}  # sample index -> its reasoning split and tool-call parser
        # aclosing: if this stream is closed early, the engine call is cancelled now, not at garbage collection.
        async with aclosing(
            self._generate(request, request_id, prompt_ids, chat_fields(request), sampling, context)
        ) as deltas:
            async for delta in deltas:
                sample = samples.get(delta.index)
                if sample is None:  # calls are parsed only when tools are offered
                    sample = samples[delta.index] = ChatSample(request_id, starts_in_reasoning, bool(tools))
                if (response := sample.push(delta)) is not None:
                    yield response

    @handle_errors
    async def Complete(
        self, request: tokenizer_pb2.CompleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[tokenizer_pb2.CompleteResponse]:
        _check_text_generation(request, self._limits)
        request_id = request.request_id or uuid.uuid4().hex
        bind_request_id(request_id)
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        check_text("prompt", request.prompt, self._limits)
        prompt_ids = await asyncio.to_thread(self._tokenizer.encode, request.prompt)
        prompt_ids = _truncated(prompt_ids, request.sampling_params)
        await self._check_prompt_length(prompt_ids, "prompt")
        async with aclosing(
            self._generate(
                request, request_id, prompt_ids, {"prompt_token_ids": "prompt"}, request.sampling_params, context
            )
        ) as deltas:
            async for delta in deltas:
                if delta.finished:
                    yield tokenizer_pb2.CompleteResponse(
                        request_id=request_id,
                        text=delta.text,
                        finish_reason=delta.finish_reason,
                        usage=delta.usage,
                        matched_stop=delta.matched_stop,
                        prompt_logprobs=delta.prompt_logprobs,
                        index=delta.index,
                    )
                elif delta.text or delta.prompt_logprobs:
                    yield tokenizer_pb2.CompleteResponse(
                        request_id=request_id, text=delta.text, prompt_logprobs=delta.prompt_logprobs, index=delta.index
                    )

    async def _generate(
        self,
        request: tokenizer_pb2.ChatRequest | tokenizer_pb2.CompleteRequest,
        request_id: str,
        prompt_ids: list[int],
        fields: Mapping[str, str],
        sampling: engine_pb2.SamplingParams,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[TextDelta, None]:
        """Call the engine and turn its token stream into text deltas, per sample (``sampling.n``), each
        sample ending with a finished one; a matched stop string (``request.stop``) ends its sample's text,
        and is its last piece with ``request.include_stop_str_in_output``; it also aborts that sample in the
        engine while its siblings go on. Returns once every sample has ended. ``request`` gives the
        generation fields Chat and Complete share (stop strings, priority, cache_salt); ``request_id`` is
        its id or the one made up for it, ``sampling`` the engine's parameters made from it.
        ``fields``: the engine's request fields by the name the caller sent them under (``prompt_token_ids``:
        ``messages``): the engine's INVALID_ARGUMENT about one of them names the caller's field."""
        stops, include_stop = request.stop, request.include_stop_str_in_output
        samples = [
            SampleText(self._tokenizer.backend, stops, include_stop, len(prompt_ids), i)
            for i in range(sampling.n if sampling.HasField("n") else 1)
        ]
        unfinished = len(samples)
        call = self._engine.Generate(
            engine_pb2.GenerateRequest(
                request_id=request_id,
                prompt_token_ids=prompt_ids,
                sampling_params=sampling,
                priority=request.priority,
                cache_salt=request.cache_salt,
            ),
            timeout=context.time_remaining(),
        )  # gRPC does not pass deadlines on by itself
        self._live.add(request_id)
        try:
            async for response in call:
                if response.index >= len(samples):
                    raise ServiceError(f"the engine sent sample {response.index} of a request for {len(samples)}")
                sample = samples[response.index]
                if sample.done:  # ended by a stop string here; the engine's late tokens are dropped
                    continue
                delta = await sample.push(response)
                if delta is None:
                    continue
                if delta.finished:
                    unfinished -= 1
                    if unfinished and not response.finish_reason:  # its stop string: the engine still runs it
                        self._sample_aborts.send(request_id, delta.index)
                yield delta
                if not unfinished:
                    return
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc, "engine")
            if isinstance(error, InvalidArgument) and error.field in fields:
                error = InvalidArgument(fields[error.field], error.description)
            raise error from exc
        finally:
            # No-op when the engine finished; otherwise (stop string, client cancel, deadline, error)
            # the engine sees CANCELLED and aborts the request.
            call.cancel()
            self._live.discard(request_id)
        raise ServiceError(f"engine stream for request {request_id} ended without a finish reason")


@dataclass
class TokenizerServer:
    """A started tokenizer server and what it owns; :meth:`stop` releases all of it."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    engine_channel: grpc.aio.Channel
    probe: EngineHealthProbe
    servicer: TokenizerServicer

    async def abort_all(self) -> None:
        """End every running stream with a final ABORTED message (the end of a graceful shutdown)."""
        await self.servicer.abort_all()

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new RPCs, give running ones ``grace_s``, close the channel."""
        await self.probe.stop()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.engine_channel.close()


async def start_tokenizer_server(
    tokenizer: ChatTokenizer,
    engine_target: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    server_config: ServerConfig | None = None,
    probe_interval_s: float = 2.0,
    probe_timeout_s: float = 1.0,
    limits: RequestLimits | None = None,
    engine_security: ChannelSecurity | None = None,
) -> TokenizerServer:
    """Build, bind and start the server (port 0: a free one) and the engine health probe.
    ``engine_security``: how to reach a secured engine (TLS, client certificate, API key)."""
    server, health = build_server([SERVICE_NAME], server_config)
    channel = engine_channel(engine_target, server_config, engine_security)
    servicer = TokenizerServicer(tokenizer, engine_pb2_grpc.EngineServiceStub(channel), limits)
    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(servicer, server)
    try:
        bound = bind(server, host, port, server_config.security if server_config is not None else None)
    except OSError:
        await channel.close()
        raise
    await server.start()
    probe = EngineHealthProbe(
        channel, health, [SERVICE_NAME], probe_interval_s, probe_timeout_s, on_serving=servicer.forget_model_info
    )
    probe.start()
    log.info("tokenizer service listening", extra={"address": f"{host}:{bound}", "engine": engine_target})
    return TokenizerServer(server, health, bound, channel, probe, servicer)
