"""Thin Python clients for both services, over the generated stubs (sync and asyncio).

    async with AsyncTokenizerClient("127.0.0.1:50052") as client:
        async for r in client.chat([{"role": "user", "content": "Hi"}], max_tokens=64, temperature=0.7):
            print(r.reasoning_text or r.text, end="")

    with EngineClient("127.0.0.1:50051") as engine:
        for r in engine.generate([9707, 11], max_tokens=8, temperature=0):
            print(r.token_ids, r.finish_reason)

Sampling fields are keyword arguments named as in ``SamplingParams`` (an unknown name is a
TypeError). Messages and tools may be protos or OpenAI-style dicts. Failures are raised as the
``grpc.RpcError`` the server sent (see ``service_common.errors.from_rpc_error`` for domain errors).
Leaving a stream early cancels the call, which aborts the request on the server.

Secured servers (``--tls-cert``, ``--tls-client-ca``, ``--api-key``): every client takes
``root_certificates`` (PEM bytes of the CA to trust; TLS with the system's CAs when only ``tls=True``),
``certificate_chain``/``private_key`` (mutual TLS) and ``api_key`` (sent as ``authorization: Bearer``)::

    TokenizerClient("host:50052", root_certificates=Path("ca.pem").read_bytes(), api_key=key)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc
import grpc.aio

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from service_common.security import ChannelSecurity, ChannelTls, aio_channel, sync_channel

_SAMPLING_FIELDS = frozenset(engine_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
C = TypeVar("C")
MessageLike = tokenizer_pb2.ChatMessage | Mapping[str, Any]
ToolLike = tokenizer_pb2.Tool | Mapping[str, Any]


def sampling_params(**fields: Any) -> engine_pb2.SamplingParams:
    """``SamplingParams`` from keyword arguments; None values are left unset (engine default).
    ``logit_bias`` is a dict (token id -> bias); ``bad_words`` may be lists of token ids."""
    unknown = sorted(set(fields) - _SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {sorted(_SAMPLING_FIELDS)}")
    if fields.get("bad_words") is not None:
        fields["bad_words"] = [
            w if isinstance(w, engine_pb2.TokenSequence) else engine_pb2.TokenSequence(token_ids=w)
            for w in fields["bad_words"]
        ]
    return engine_pb2.SamplingParams(**{k: v for k, v in fields.items() if v is not None})


def _embed_request(prompt_token_ids: Sequence[int], normalize: bool | None) -> engine_pb2.EmbedRequest:
    request = engine_pb2.EmbedRequest(prompt_token_ids=prompt_token_ids)
    if normalize is not None:
        request.normalize = normalize
    return request


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def chat_message(message: MessageLike) -> tokenizer_pb2.ChatMessage:
    """A ChatMessage from a proto or an OpenAI-style dict (``tool_calls[i].function.arguments`` may be
    a dict or JSON text)."""
    if isinstance(message, tokenizer_pb2.ChatMessage):
        return message
    known = {"role", "content", "reasoning_content", "tool_calls", "tool_call_id"}
    unknown = sorted(set(message) - known)
    if unknown:
        raise ValueError(f"unknown chat message key(s) {unknown}; known: {sorted(known)}")
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function", call)  # OpenAI nests name/arguments under "function"
        calls.append(
            tokenizer_pb2.ToolCall(
                id=call.get("id", ""), name=function["name"], arguments_json=_json_text(function.get("arguments", {}))
            )
        )
    out = tokenizer_pb2.ChatMessage(
        role=message["role"],
        content=message.get("content") or "",
        tool_calls=calls,
        tool_call_id=message.get("tool_call_id", ""),
    )
    if message.get("reasoning_content") is not None:
        out.reasoning_content = message["reasoning_content"]
    return out


def chat_tool(tool: ToolLike) -> tokenizer_pb2.Tool:
    """A Tool from a proto or an OpenAI function-tool dict (``{"type": "function", "function": {...}}``)."""
    if isinstance(tool, tokenizer_pb2.Tool):
        return tool
    function = tool.get("function", tool)
    parameters = function.get("parameters")
    return tokenizer_pb2.Tool(
        name=function["name"],
        description=function.get("description", ""),
        parameters_json="" if parameters is None else _json_text(parameters),
    )


def _chat_request(
    messages: Iterable[MessageLike],
    tools: Iterable[ToolLike],
    enable_thinking: bool | None,
    stop: Sequence[str],
    request_id: str,
    sampling: Mapping[str, Any],
) -> tokenizer_pb2.ChatRequest:
    request = tokenizer_pb2.ChatRequest(
        request_id=request_id,
        messages=[chat_message(m) for m in messages],
        tools=[chat_tool(t) for t in tools],
        sampling_params=sampling_params(**sampling),
        stop=list(stop),
    )
    if enable_thinking is not None:
        request.enable_thinking = enable_thinking
    return request


def _template_request(
    messages: Iterable[MessageLike],
    tools: Iterable[ToolLike],
    add_generation_prompt: bool,
    enable_thinking: bool | None,
) -> tokenizer_pb2.ApplyChatTemplateRequest:
    request = tokenizer_pb2.ApplyChatTemplateRequest(
        messages=[chat_message(m) for m in messages],
        tools=[chat_tool(t) for t in tools],
        add_generation_prompt=add_generation_prompt,
    )
    if enable_thinking is not None:
        request.enable_thinking = enable_thinking
    return request


def _security(
    channel: object,
    tls: bool | None,
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
    api_key: str | None,
) -> ChannelSecurity:
    """TLS when asked (``tls``) or implied by any certificate argument; the key sent on every call."""
    given = tls or root_certificates or certificate_chain or private_key or api_key
    if channel is not None and given:
        raise TypeError("give either a channel (with its own credentials) or credentials, not both")
    use_tls = tls if tls is not None else any(x is not None for x in (root_certificates, certificate_chain))
    return ChannelSecurity(ChannelTls(root_certificates, certificate_chain, private_key) if use_tls else None, api_key)


# ---- transports ---------------------------------------------------------------------------------
# Each RPC method is written once, in the asyncio clients, against two primitives: ``_unary(call, pick)``
# (the call's response, through ``pick``) and ``_stream(call)`` (its responses; leaving early cancels the
# call, which aborts the request on the server). The asyncio base awaits; the blocking base calls. The
# blocking clients reuse the same functions (``_blocking``): only their static types differ.
def _same(response: R) -> R:
    return response


class _Client:
    """The constructor all four clients share: a target (a channel is made for it) or a ready channel."""

    stub_class: Any  # the generated stub class of the service

    def __init__(
        self,
        target: str = "",
        channel: Any = None,  # a grpc.aio.Channel for the asyncio clients, a grpc.Channel for the blocking ones
        *,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        api_key: str | None = None,
    ) -> None:
        security = _security(channel, tls, root_certificates, certificate_chain, private_key, api_key)
        self._own_channel = channel is None
        self.channel = channel or self._make_channel(target, security)
        self.stub = self.stub_class(self.channel)

    @staticmethod
    def _make_channel(target: str, security: ChannelSecurity) -> Any:
        raise NotImplementedError


class _AsyncTransport(_Client):
    channel: grpc.aio.Channel

    @staticmethod
    def _make_channel(target: str, security: ChannelSecurity) -> grpc.aio.Channel:
        return aio_channel(target, _CHANNEL_OPTIONS, security)

    @staticmethod
    async def _unary(call: Awaitable[R], pick: Callable[[R], T]) -> T:
        return pick(await call)

    @staticmethod
    async def _stream(call: grpc.aio.UnaryStreamCall[Any, R]) -> AsyncIterator[R]:
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()  # no-op when the stream ended; otherwise the server aborts the request

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()

    async def __aenter__(self: C) -> C:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _SyncTransport(_Client):
    channel: grpc.Channel

    @staticmethod
    def _make_channel(target: str, security: ChannelSecurity) -> grpc.Channel:
        return sync_channel(target, _CHANNEL_OPTIONS, security)

    @staticmethod
    def _unary(call: R, pick: Callable[[R], T]) -> T:
        return pick(call)

    @staticmethod
    def _stream(call: Any) -> Iterator[Any]:  # a grpc._channel._MultiThreadedRendezvous
        try:
            yield from call
        finally:
            call.cancel()  # no-op when the stream ended; otherwise the server aborts the request

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _blocking(method: Callable[Concatenate[Any, P], Awaitable[T]]) -> Callable[Concatenate[Any, P], T]:
    """An asyncio client's method, typed as the blocking client's: the function is the same (its body only
    builds the request and hands the call to ``_unary``, which in a blocking client returns the response)."""
    return method  # type: ignore[return-value]  # the retyping is the point (see the comment above)


def _blocking_stream(
    method: Callable[Concatenate[Any, P], AsyncIterator[T]],
) -> Callable[Concatenate[Any, P], Iterator[T]]:
    """:func:`_blocking` for a streaming method (``_stream`` of a blocking client returns an iterator)."""
    return method  # type: ignore[return-value]


# ---- the RPCs ----------------------------------------------------------------------------------
class AsyncEngineClient(_AsyncTransport):
    """EngineService over a ``grpc.aio`` channel (created for ``target`` unless one is given)."""

    stub_class = engine_pb2_grpc.EngineServiceStub
    stub: engine_pb2_grpc.EngineServiceAsyncStub

    def generate(
        self, /, prompt_token_ids: Sequence[int], *, request_id: str = "", timeout: float | None = None, **sampling: Any
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        request = engine_pb2.GenerateRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=sampling_params(**sampling)
        )
        return self._stream(self.stub.Generate(request, timeout=timeout))

    def embed(
        self, prompt_token_ids: Sequence[int], *, normalize: bool | None = None, timeout: float | None = None
    ) -> Awaitable[list[float]]:
        """The prompt's embedding (normalize None: the checkpoint's default)."""
        call = self.stub.Embed(_embed_request(prompt_token_ids, normalize), timeout=timeout)
        return self._unary(call, lambda r: list(r.embedding))

    def abort(self, request_id: str, timeout: float | None = None) -> Awaitable[bool]:
        call = self.stub.Abort(engine_pb2.AbortRequest(request_id=request_id), timeout=timeout)
        return self._unary(call, lambda r: r.aborted)

    def model_info(self, timeout: float | None = None) -> Awaitable[engine_pb2.GetModelInfoResponse]:
        return self._unary(self.stub.GetModelInfo(engine_pb2.GetModelInfoRequest(), timeout=timeout), _same)

    def load(self, timeout: float | None = None) -> Awaitable[engine_pb2.GetLoadResponse]:
        return self._unary(self.stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=timeout), _same)


class AsyncTokenizerClient(_AsyncTransport):
    """TokenizerService over a ``grpc.aio`` channel (created for ``target`` unless one is given)."""

    stub_class = tokenizer_pb2_grpc.TokenizerServiceStub
    stub: tokenizer_pb2_grpc.TokenizerServiceAsyncStub

    def tokenize(
        self, text: str, add_special_tokens: bool = False, timeout: float | None = None
    ) -> Awaitable[list[int]]:
        request = tokenizer_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return self._unary(self.stub.Tokenize(request, timeout=timeout), lambda r: list(r.token_ids))

    def detokenize(
        self, token_ids: Sequence[int], skip_special_tokens: bool = False, timeout: float | None = None
    ) -> Awaitable[str]:
        request = tokenizer_pb2.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return self._unary(self.stub.Detokenize(request, timeout=timeout), lambda r: r.text)

    def apply_chat_template(
        self,
        messages: Iterable[MessageLike],
        tools: Iterable[ToolLike] = (),
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        timeout: float | None = None,
    ) -> Awaitable[tokenizer_pb2.ApplyChatTemplateResponse]:
        request = _template_request(messages, tools, add_generation_prompt, enable_thinking)
        return self._unary(self.stub.ApplyChatTemplate(request, timeout=timeout), _same)

    def chat(
        self,
        /,
        messages: Iterable[MessageLike],
        tools: Iterable[ToolLike] = (),
        *,
        enable_thinking: bool | None = None,
        stop: Sequence[str] = (),
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncIterator[tokenizer_pb2.ChatResponse]:
        request = _chat_request(messages, tools, enable_thinking, stop, request_id, sampling)
        return self._stream(self.stub.Chat(request, timeout=timeout))

    def complete(
        self,
        /,
        prompt: str,
        *,
        stop: Sequence[str] = (),
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncIterator[tokenizer_pb2.CompleteResponse]:
        request = tokenizer_pb2.CompleteRequest(
            request_id=request_id, prompt=prompt, stop=list(stop), sampling_params=sampling_params(**sampling)
        )
        return self._stream(self.stub.Complete(request, timeout=timeout))


class EngineClient(_SyncTransport):
    """EngineService over a blocking channel (not for use on an event loop thread)."""

    stub_class = engine_pb2_grpc.EngineServiceStub
    generate = _blocking_stream(AsyncEngineClient.generate)
    embed = _blocking(AsyncEngineClient.embed)
    abort = _blocking(AsyncEngineClient.abort)
    model_info = _blocking(AsyncEngineClient.model_info)
    load = _blocking(AsyncEngineClient.load)


class TokenizerClient(_SyncTransport):
    """TokenizerService over a blocking channel (not for use on an event loop thread)."""

    stub_class = tokenizer_pb2_grpc.TokenizerServiceStub
    tokenize = _blocking(AsyncTokenizerClient.tokenize)
    detokenize = _blocking(AsyncTokenizerClient.detokenize)
    apply_chat_template = _blocking(AsyncTokenizerClient.apply_chat_template)
    chat = _blocking_stream(AsyncTokenizerClient.chat)
    complete = _blocking_stream(AsyncTokenizerClient.complete)
