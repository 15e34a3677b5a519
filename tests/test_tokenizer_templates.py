"""Tokenize / Detokenize / ApplyChatTemplate over gRPC (loopback), against transformers on the real
Qwen3 tokenizer and chat template."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from serving import free_port

from clients import AsyncTokenizerClient, TokenizerClient, chat_message
from qwen3serve.tokenizer.v1 import tokenizer_pb2
from service_common.errors import bad_request_field
from tokenizer_service.chat_template import ChatTokenizer
from tokenizer_service.server import TokenizerServer, start_tokenizer_server

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}},
}

TOOL_CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather and time in Paris? 天气如何？"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}},
            },
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp": 21, "sky": "☀️"})},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
]
CASES: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]] = [
    (
        "system-user",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}],
        [],
        {"add_generation_prompt": True},
    ),
    (
        "no-thinking",
        [{"role": "user", "content": "2+2?"}],
        [],
        {"add_generation_prompt": True, "enable_thinking": False},
    ),
    (
        "thinking-explicit",
        [{"role": "user", "content": "2+2?"}],
        [],
        {"add_generation_prompt": True, "enable_thinking": True},
    ),
    ("tools-pending", TOOL_CONVERSATION, [WEATHER_TOOL, TIME_TOOL], {"add_generation_prompt": True}),
    (
        "tools-answered",
        [*TOOL_CONVERSATION, {"role": "assistant", "content": "21°C and sunny; 14:05."}],
        [WEATHER_TOOL, TIME_TOOL],
        {"add_generation_prompt": False},
    ),
    (
        "tools-no-system",
        TOOL_CONVERSATION[1:],
        [WEATHER_TOOL],
        {"add_generation_prompt": True, "enable_thinking": False},
    ),
    (
        "multi-turn-reasoning",
        [
            {"role": "user", "content": "First?"},
            {"role": "assistant", "content": "One.", "reasoning_content": "Count from one."},
            {"role": "user", "content": "Second?"},
            {"role": "assistant", "content": "Two.", "reasoning_content": "Then two."},
        ],
        [],
        {"add_generation_prompt": False},
    ),
    (
        "inline-think",
        [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA"},
            {"role": "user", "content": "Q2"},
        ],
        [],
        {"add_generation_prompt": True},
    ),
]


@pytest.fixture
async def server(tokenizer: ChatTokenizer) -> AsyncIterator[TokenizerServer]:
    # No engine is needed here: the engine address points at a closed port.
    running = await start_tokenizer_server(tokenizer, f"127.0.0.1:{free_port()}", probe_interval_s=60)
    yield running
    await running.stop(0)


@pytest.fixture
async def client(server: TokenizerServer) -> AsyncIterator[AsyncTokenizerClient]:
    async with AsyncTokenizerClient(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.mark.parametrize("name,messages,tools,kwargs", CASES, ids=[c[0] for c in CASES])
async def test_apply_chat_template_matches_transformers(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer, name: str, messages: list, tools: list, kwargs: dict
) -> None:
    reference_text = tokenizer.hf.apply_chat_template(
        copy.deepcopy(messages), tools=tools or None, tokenize=False, **kwargs
    )
    reference_ids = tokenizer.hf.apply_chat_template(
        copy.deepcopy(messages), tools=tools or None, tokenize=True, **kwargs
    )["input_ids"]
    response = await client.apply_chat_template(messages, tools, **kwargs)
    assert response.prompt == reference_text
    assert list(response.prompt_token_ids) == reference_ids
    if tools:  # the case exercises what it claims to
        assert "<tools>" in response.prompt and "<tool_call>" in response.prompt
        assert "<tool_response>" in response.prompt
    if kwargs.get("enable_thinking") is False:
        assert response.prompt.endswith("<think>\n\n</think>\n\n")


async def test_tokenize_and_detokenize_match_transformers(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer
) -> None:
    text = "<|im_start|>user\nHello 世界 🎉 naïve<|im_end|>"
    ids = await client.tokenize(text)
    assert ids == tokenizer.hf(text, add_special_tokens=False)["input_ids"]
    assert ids == await client.tokenize(text, add_special_tokens=True)  # Qwen3 adds no BOS/EOS
    for skip in (False, True):
        assert await client.detokenize(ids, skip_special_tokens=skip) == tokenizer.hf.decode(
            ids, skip_special_tokens=skip
        )
    assert await client.detokenize([]) == ""


async def test_sync_client(server: TokenizerServer, tokenizer: ChatTokenizer) -> None:
    def run() -> tuple[list[int], str]:
        with TokenizerClient(f"127.0.0.1:{server.port}") as c:
            response = c.apply_chat_template([{"role": "user", "content": "hi"}])
            return list(response.prompt_token_ids), c.detokenize(response.prompt_token_ids)

    ids, text = await asyncio.to_thread(run)  # blocking client off the event loop thread
    messages = [{"role": "user", "content": "hi"}]
    assert text == tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == tokenizer.hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def _msg(**fields: Any) -> tokenizer_pb2.ChatMessage:
    return tokenizer_pb2.ChatMessage(**fields)


BAD_REQUESTS = [
    ("messages", [], []),
    ("messages[1].role", [_msg(role="user", content="a"), _msg(role="robot", content="b")], []),
    (
        "messages[1].tool_calls[0].arguments_json",
        [
            _msg(role="user", content="a"),
            _msg(role="assistant", tool_calls=[tokenizer_pb2.ToolCall(name="f", arguments_json="{not json")]),
        ],
        [],
    ),
    (
        "messages[1].tool_calls[0].arguments_json",
        [
            _msg(role="user", content="a"),
            _msg(role="assistant", tool_calls=[tokenizer_pb2.ToolCall(name="f", arguments_json="[1, 2]")]),
        ],
        [],
    ),
    ("messages[0].tool_calls", [_msg(role="user", content="a", tool_calls=[tokenizer_pb2.ToolCall(name="f")])], []),
    ("messages[1].tool_call_id", [_msg(role="user", content="a"), _msg(role="assistant", tool_call_id="x")], []),
    (
        "tools[1].parameters_json",
        [_msg(role="user", content="a")],
        [tokenizer_pb2.Tool(name="ok"), tokenizer_pb2.Tool(name="bad", parameters_json='"a string"')],
    ),
    ("tools[0].name", [_msg(role="user", content="a")], [tokenizer_pb2.Tool(description="nameless")]),
]


@pytest.mark.parametrize("field,messages,tools", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
async def test_bad_conversations_are_invalid_argument_naming_the_field(
    client: AsyncTokenizerClient, field: str, messages: list, tools: list
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.apply_chat_template(messages, tools)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(info.value) == field
    assert info.value.details().startswith(f"{field}: ")


async def test_detokenize_rejects_ids_outside_the_vocabulary(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.detokenize([1, tokenizer.vocab_size, 2])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(info.value) == "token_ids[1]"


def test_client_message_dicts_round_trip() -> None:
    proto = chat_message(TOOL_CONVERSATION[2])
    assert [(c.id, c.name, json.loads(c.arguments_json)) for c in proto.tool_calls] == [
        ("call_1", "get_weather", {"city": "Paris", "unit": "C"}),
        ("call_2", "get_time", {}),
    ]
    assert not proto.HasField("reasoning_content")
    with pytest.raises(ValueError, match="toolcalls"):
        chat_message({"role": "assistant", "content": "", "toolcalls": []})
