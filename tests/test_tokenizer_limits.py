"""Request limits, hostile tool JSON and prompt-length errors of the tokenizer service, over real
loopback sockets: every bad request is INVALID_ARGUMENT naming the field (and the limit), answered in
well under a second, before any tokenizing, parsing or engine call."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from serving import free_port

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from service_common.errors import InvalidArgument, bad_request_field, handle_errors
from service_common.server import bind, build_server
from tokenizer_service.chat_template import ChatTokenizer
from tokenizer_service.config import RequestLimits
from tokenizer_service.engine_link import ENGINE_SERVICE_NAME
from tokenizer_service.limits import json_depth
from tokenizer_service.server import TokenizerServer, start_tokenizer_server

SMALL = RequestLimits(
    max_text_bytes=1000,
    max_chat_messages=4,
    max_tools=2,
    max_tool_json_bytes=200,
    max_json_depth=5,
    max_stop_strings=2,
    max_stop_bytes=8,
    max_request_id_bytes=16,
)

Msg, Tool, Call = tokenizer_pb2.ChatMessage, tokenizer_pb2.Tool, tokenizer_pb2.ToolCall
USER = Msg(role="user", content="hi")


def chat_request(**fields) -> tokenizer_pb2.ChatRequest:
    return tokenizer_pb2.ChatRequest(**{"messages": [USER], **fields})


def complete_request(**fields) -> tokenizer_pb2.CompleteRequest:
    return tokenizer_pb2.CompleteRequest(**{"prompt": "hi", **fields})


def _calls(arguments_json: str) -> list[tokenizer_pb2.ChatMessage]:
    return [USER, Msg(role="assistant", tool_calls=[Call(name="f", arguments_json=arguments_json)])]


async def _call(stub: tokenizer_pb2_grpc.TokenizerServiceStub, request) -> None:
    """Send ``request`` to the RPC its type belongs to; streams are read to their end."""
    method = {
        tokenizer_pb2.TokenizeRequest: stub.Tokenize,
        tokenizer_pb2.CompleteRequest: stub.Complete,
        tokenizer_pb2.ChatRequest: stub.Chat,
        tokenizer_pb2.ApplyChatTemplateRequest: stub.ApplyChatTemplate,
    }[type(request)]
    call = method(request, timeout=30)
    if isinstance(request, (tokenizer_pb2.ChatRequest, tokenizer_pb2.CompleteRequest)):
        async for _ in call:
            pass
    else:
        await call


async def assert_rejected(stub: tokenizer_pb2_grpc.TokenizerServiceStub, request, field: str, *fragments: str) -> str:
    """Assert INVALID_ARGUMENT naming ``field`` within a second; returns the message."""
    start = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(stub, request)
    elapsed = time.perf_counter() - start
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert bad_request_field(info.value) == field, info.value.details()
    details = info.value.details()
    assert details.startswith(f"{field}: ")
    for fragment in fragments:
        assert fragment in details
    assert elapsed < 1.0, f"answered in {elapsed:.2f} s"
    return details


async def _stub_for(tokenizer: ChatTokenizer, limits: RequestLimits | None) -> tuple[TokenizerServer, grpc.aio.Channel]:
    # No engine: the address is a closed port, so anything that reaches the engine fails UNAVAILABLE.
    running = await start_tokenizer_server(tokenizer, f"127.0.0.1:{free_port()}", probe_interval_s=60, limits=limits)
    return running, grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")


async def _serve(
    tokenizer: ChatTokenizer, limits: RequestLimits | None
) -> AsyncIterator[tokenizer_pb2_grpc.TokenizerServiceStub]:
    running, channel = await _stub_for(tokenizer, limits)
    yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)
    await channel.close()
    await running.stop(0)


@pytest.fixture
async def stub(tokenizer: ChatTokenizer) -> AsyncIterator[tokenizer_pb2_grpc.TokenizerServiceStub]:
    """A tokenizer server with the default limits."""
    async for s in _serve(tokenizer, None):
        yield s


@pytest.fixture
async def small(tokenizer: ChatTokenizer) -> AsyncIterator[tokenizer_pb2_grpc.TokenizerServiceStub]:
    """A tokenizer server with SMALL limits."""
    async for s in _serve(tokenizer, SMALL):
        yield s


SMALL_CASES = [  # (name, request, field, text the message must hold)
    ("tokenize-text", tokenizer_pb2.TokenizeRequest(text="a" * 1001), "text", "--max-text-bytes"),
    ("tokenize-text-utf8", tokenizer_pb2.TokenizeRequest(text="é" * 501), "text", "1002 bytes; the limit is 1000"),
    ("complete-prompt", complete_request(prompt="a" * 1001), "prompt", "limit of 1000"),
    ("complete-stop-count", complete_request(stop=["a", "b", "c"]), "stop", "3 stop strings; the limit is 2"),
    ("complete-stop-length", complete_request(stop=["a", "123456789"]), "stop[1]", "--max-stop-bytes"),
    ("complete-request-id", complete_request(request_id="r" * 17), "request_id", "--max-request-id-bytes"),
    ("chat-request-id", chat_request(request_id="r" * 17), "request_id", "limit of 16"),
    ("chat-stop-count", chat_request(stop=["a", "b", "c"]), "stop", "--max-stop-strings"),
    ("chat-messages", chat_request(messages=[USER] * 5), "messages", "5 messages; the limit is 4"),
    (
        "chat-content",
        chat_request(messages=[USER, Msg(role="user", content="x" * 1001)]),
        "messages[1].content",
        "--max-text-bytes",
    ),
    ("chat-total", chat_request(messages=[Msg(role="user", content="x" * 400)] * 3), "messages", "1200 bytes in all"),
    ("chat-tools", chat_request(tools=[Tool(name="a")] * 3), "tools", "--max-tools"),
    (
        "chat-tool-json",
        chat_request(tools=[Tool(name="a", parameters_json="{}" + " " * 199)]),
        "tools[0].parameters_json",
        "--max-tool-json-bytes",
    ),
    (
        "chat-tool-depth",
        chat_request(tools=[Tool(name="a", parameters_json='{"a": [[[[[1]]]]]}')]),
        "tools[0].parameters_json",
        "6 levels deep; the limit is 5 (--max-json-depth)",
    ),
    (
        "template-call-depth",
        tokenizer_pb2.ApplyChatTemplateRequest(messages=_calls('{"a": {"b": {"c": [[{}]]}}}')),
        "messages[1].tool_calls[0].arguments_json",
        "--max-json-depth",
    ),
    (
        "template-call-size",
        tokenizer_pb2.ApplyChatTemplateRequest(messages=_calls("{}" + " " * 199)),
        "messages[1].tool_calls[0].arguments_json",
        "--max-tool-json-bytes",
    ),
]


@pytest.mark.parametrize("name,request_,field,fragment", SMALL_CASES, ids=[c[0] for c in SMALL_CASES])
async def test_configured_limits_name_the_field_and_the_limit(
    small: tokenizer_pb2_grpc.TokenizerServiceStub, name: str, request_, field: str, fragment: str
) -> None:
    await assert_rejected(small, request_, field, fragment)


async def test_within_the_limits_is_served(
    small: tokenizer_pb2_grpc.TokenizerServiceStub, tokenizer: ChatTokenizer
) -> None:
    """The limits are not off by one: a request exactly at each of them is served."""
    text = "é" * 500  # 1000 bytes
    response = await small.Tokenize(tokenizer_pb2.TokenizeRequest(text=text), timeout=10)
    assert list(response.token_ids) == tokenizer.encode(text)
    messages = [
        Msg(role="system", content="x" * 300),
        Msg(role="user", content="y" * 300),
        *_calls('{"a": {"b": {"c": [[1]]}}}' + " " * 170),
    ]
    tools = [Tool(name="a", parameters_json='{"type": "object"}'), Tool(name="b")]
    response = await small.ApplyChatTemplate(
        tokenizer_pb2.ApplyChatTemplateRequest(messages=messages, tools=tools, add_generation_prompt=True), timeout=10
    )
    assert '"c": [[1]]' in response.prompt and response.prompt_token_ids


HUGE = 6 * 2**20  # the size the issue saw freeze the service for 5 s


HUGE_CASES = [  # (name, request factory, field): built when the test runs, not at collection
    ("tokenize", lambda: tokenizer_pb2.TokenizeRequest(text="word " * (HUGE // 5)), "text"),
    ("complete", lambda: complete_request(prompt="word " * (HUGE // 5)), "prompt"),
    ("chat", lambda: chat_request(messages=[Msg(role="user", content="word " * (HUGE // 5))]), "messages[0].content"),
    ("request-id", lambda: complete_request(request_id="r" * HUGE), "request_id"),
    ("stops", lambda: complete_request(stop=["s"] * 100_000), "stop"),
    ("messages", lambda: chat_request(messages=[USER] * 100_000), "messages"),
]


@pytest.mark.parametrize("name,make,field", HUGE_CASES, ids=[c[0] for c in HUGE_CASES])
async def test_huge_requests_are_rejected_at_once_by_default(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub, name: str, make, field: str
) -> None:
    await assert_rejected(stub, make(), field, "the limit")


# ---- hostile tool JSON: INVALID_ARGUMENT naming the field, never INTERNAL ---------------------------
DEEP = "[" * 10_000 + "]" * 10_000
LONE_SURROGATE = '{"city": "\\ud800"}'


@pytest.mark.parametrize(
    "text,fragment",
    [
        (DEEP, "levels deep"),
        ("{" + '"a":[' * 5000, "levels deep"),
        (LONE_SURROGATE, "\\ud800"),
        ('{"a": "\\udc00\\ud800"}', "\\udc00"),
    ],
    ids=["deep-array", "deep-unclosed", "lone-surrogate", "reversed-pair"],
)
async def test_hostile_tool_json_is_invalid_argument(
    stub: tokenizer_pb2_grpc.TokenizerServiceStub, text: str, fragment: str
) -> None:
    await assert_rejected(
        stub,
        tokenizer_pb2.ApplyChatTemplateRequest(messages=[USER], tools=[Tool(name="f", parameters_json=text)]),
        "tools[0].parameters_json",
        fragment,
    )
    await assert_rejected(
        stub, chat_request(tools=[Tool(name="f", parameters_json=text)]), "tools[0].parameters_json", fragment
    )
    await assert_rejected(
        stub,
        tokenizer_pb2.ApplyChatTemplateRequest(messages=_calls(text)),
        "messages[1].tool_calls[0].arguments_json",
        fragment,
    )
    await assert_rejected(
        stub, chat_request(messages=_calls(text)), "messages[1].tool_calls[0].arguments_json", fragment
    )


async def test_surrogate_pairs_and_brackets_in_strings_are_fine(stub: tokenizer_pb2_grpc.TokenizerServiceStub) -> None:
    response = await stub.ApplyChatTemplate(
        tokenizer_pb2.ApplyChatTemplateRequest(
            messages=_calls('{"emoji": "\\ud83d\\ude00", "s": "' + "[" * 100 + '"}')
        ),
        timeout=10,
    )
    assert "😀" in response.prompt and "[" * 100 in response.prompt


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth('{"a": [1, {"b": "[[[[\\"{{"}]}') == 3
    assert json_depth("[]") == 1 and json_depth('"x"') == 0 and json_depth("") == 0
    assert json_depth("[" * 10_000) == 10_000


# ---- the engine's prompt errors name what the caller sent (real engine: test_tokenizer_engine_limits.py) --
class _EngineRejectingPrompts(engine_pb2_grpc.EngineServiceServicer):
    """An engine without GetModelInfo (UNIMPLEMENTED) whose Generate finds every prompt too long."""

    @handle_errors
    async def Generate(
        self, request: engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        raise InvalidArgument("prompt_token_ids", f"the prompt has {len(request.prompt_token_ids)} tokens; too many")
        yield engine_pb2.GenerateResponse()  # pragma: no cover - makes this an async generator


@pytest.mark.parametrize("kind", ["chat", "complete"])
async def test_engine_prompt_errors_name_messages_or_prompt(tokenizer: ChatTokenizer, kind: str) -> None:
    """Without GetModelInfo the engine's own check decides; its field is renamed to what the caller sent."""
    engine, _ = build_server([ENGINE_SERVICE_NAME])
    engine_pb2_grpc.add_EngineServiceServicer_to_server(_EngineRejectingPrompts(), engine)
    engine_port = bind(engine, "127.0.0.1", 0)
    await engine.start()
    running = await start_tokenizer_server(tokenizer, f"127.0.0.1:{engine_port}", probe_interval_s=60)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            await assert_rejected(
                stub,
                chat_request() if kind == "chat" else complete_request(),
                "messages" if kind == "chat" else "prompt",
                "too many",
            )
    finally:
        await running.stop(0)
        await engine.stop(0)
