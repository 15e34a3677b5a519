"""Structured output through both services over gRPC (CPU, the demo model, the real tokenizer): our
EngineService.Generate and SMG's VllmEngine.Generate with a constraint, the tokenizer service's Chat
(response_format, tool_choice) and Complete, and the INVALID_ARGUMENT answers naming the field."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import jsonschema
import pytest
import pytest_asyncio
from serving import Services, start_services
from test_sampling_controls_service import generate as generate_ids

from qwen3serve.engine.v1 import engine_pb2
from qwen3serve.smg import vllm_engine_pb2, vllm_engine_pb2_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from service_common.errors import bad_request_field
from tokenizer_service.chat_template import ChatTokenizer

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = [9707, 11, 1879]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2]}}, "required": ["ok", "n"]}
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 3}},
    "required": ["city", "days"],
}
MESSAGES = [tokenizer_pb2.ChatMessage(role="user", content="Weather?")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services(demo_checkpoint: Path, tokenizer: ChatTokenizer) -> AsyncIterator[Services]:
    running = await start_services(demo_checkpoint, tokenizer, max_model_len=256, num_kv_blocks=64)
    yield running
    await running.stop()


async def generate(services: Services, **sampling: object) -> tuple[list[int], object]:
    return await generate_ids(services, PROMPT, **sampling)


def chat_stub(services: Services) -> tokenizer_pb2_grpc.TokenizerServiceStub:
    return tokenizer_pb2_grpc.TokenizerServiceStub(grpc.aio.insecure_channel(services.tokenizer_target))


async def chat(services: Services, **fields: object) -> tuple[str, list[tokenizer_pb2.ToolCall], int]:
    request = tokenizer_pb2.ChatRequest(messages=MESSAGES, enable_thinking=False, **fields)  # type: ignore[arg-type]
    text, calls, reason = "", [], 0
    async for response in chat_stub(services).Chat(request, timeout=60):
        text += response.text
        calls += response.tool_calls
        reason = response.finish_reason or reason
    return text, calls, reason


async def test_generate_with_a_json_schema(services: Services, tokenizer: ChatTokenizer) -> None:
    finished = 0
    for seed in range(4):
        ids, last = await generate(services, json_schema=json.dumps(SCHEMA), seed=seed, max_tokens=24)
        if last.finish_reason == engine_pb2.FINISH_REASON_STOP:  # type: ignore[attr-defined]
            finished += 1
            jsonschema.validate(json.loads(tokenizer.decode(ids[:-1])), SCHEMA)
    assert finished


@pytest.mark.parametrize(
    "sampling, field, words",
    [
        ({"json_schema": '{"type": "objec"}'}, "sampling_params.json_schema", 'Unsupported type "objec"'),
        ({"regex": "a(b"}, "sampling_params.regex", "parenthesis is not closed"),
        ({"grammar": "root ::= x"}, "sampling_params.grammar", 'Rule "x" is not defined'),
        ({"json_schema": " " * 70000}, "sampling_params.json_schema", "the limit is 65536"),  # before compiling
        ({"choice": {"choices": []}}, "sampling_params.choice.choices", "at least one"),
        ({"regex": "a", "min_tokens": 2}, "sampling_params.min_tokens", "structured-output"),
    ],
)
async def test_bad_constraints_are_invalid_argument(services: Services, sampling: dict, field: str, words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(services, max_tokens=4, **sampling)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(err.value) == field and words in (err.value.details() or "")


async def test_vllm_engine_generate_with_a_constraint(services: Services, tokenizer: ChatTokenizer) -> None:
    stub = vllm_engine_pb2_grpc.VllmEngineStub(grpc.aio.insecure_channel(services.engine_target))
    for i, (constraint, check) in enumerate(
        [
            ({"json_schema": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
            ({"regex": "[a-c]{2}"}, lambda t: re.fullmatch("[a-c]{2}", t) or pytest.fail(t)),
            ({"choice": vllm_engine_pb2.ChoiceConstraint(choices=["up", "down"])}, lambda t: t in ("up", "down")),
        ]
    ):
        request = vllm_engine_pb2.GenerateRequest(
            request_id=f"v{i}",
            tokenized=vllm_engine_pb2.TokenizedInput(input_ids=PROMPT),
            sampling_params=vllm_engine_pb2.SamplingParams(
                max_tokens=24, seed=1, grammar_from_first_token=True, **constraint
            ),
        )
        ids, reason = [], ""
        async for response in stub.Generate(request, timeout=60):
            if response.HasField("complete"):
                ids, reason = list(response.complete.output_ids), response.complete.finish_reason
            else:
                ids += response.chunk.token_ids
        if reason == "stop":
            assert check(tokenizer.decode(ids[:-1])) is not False
    for sampling, field in (({"structural_tag": "{}"}, "structural_tag"), ({"regex": "a(b"}, "regex")):
        bad = vllm_engine_pb2.GenerateRequest(
            request_id="bad",
            tokenized=vllm_engine_pb2.TokenizedInput(input_ids=PROMPT),
            sampling_params=vllm_engine_pb2.SamplingParams(**sampling),
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(bad, timeout=10):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_field(err.value) == f"sampling_params.{field}"


async def test_chat_response_format(services: Services) -> None:
    fmt = tokenizer_pb2.ResponseFormat(type="json_schema", json_schema=json.dumps(SCHEMA))
    sampling = engine_pb2.SamplingParams(max_tokens=24, seed=2)
    text, _, reason = await chat(services, response_format=fmt, sampling_params=sampling)
    assert reason == engine_pb2.FINISH_REASON_STOP
    jsonschema.validate(json.loads(text), SCHEMA)
    text, _, reason = await chat(
        services, response_format=tokenizer_pb2.ResponseFormat(type="json_object"), sampling_params=sampling
    )
    assert text.startswith("{") and (reason != engine_pb2.FINISH_REASON_STOP or isinstance(json.loads(text), dict))


async def test_chat_tool_choice_forces_a_call_whose_arguments_match(services: Services) -> None:
    tools = [
        tokenizer_pb2.Tool(name="get_weather", parameters_json=json.dumps(WEATHER)),
        tokenizer_pb2.Tool(name="get_time", parameters_json=json.dumps({"type": "object", "properties": {}})),
    ]
    sampling = engine_pb2.SamplingParams(max_tokens=48, seed=5)
    for choice in (tokenizer_pb2.ToolChoice(function_name="get_weather"), tokenizer_pb2.ToolChoice(mode="required")):
        text, calls, reason = await chat(services, tools=tools, tool_choice=choice, sampling_params=sampling)
        assert reason == engine_pb2.FINISH_REASON_STOP and not text.strip() and len(calls) == 1, (text, calls)
        if choice.function_name:
            assert calls[0].name == "get_weather"
        if calls[0].name == "get_weather":
            jsonschema.validate(json.loads(calls[0].arguments_json), WEATHER)


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"tool_choice": tokenizer_pb2.ToolChoice(function_name="nope")}, "tool_choice.function_name"),
        ({"tool_choice": tokenizer_pb2.ToolChoice(mode="required")}, "tool_choice.mode"),  # no tools offered
        ({"tool_choice": tokenizer_pb2.ToolChoice(mode="sometimes")}, "tool_choice.mode"),
        ({"response_format": tokenizer_pb2.ResponseFormat(type="yaml")}, "response_format.type"),
        ({"response_format": tokenizer_pb2.ResponseFormat(type="json_schema")}, "response_format.json_schema"),
        (
            {
                "response_format": tokenizer_pb2.ResponseFormat(type="json_object"),
                "sampling_params": engine_pb2.SamplingParams(regex="a"),
            },
            "sampling_params.regex",
        ),
        ({"response_format": tokenizer_pb2.ResponseFormat(type="json_schema", json_schema="[1")}, None),
    ],
)
async def test_chat_format_errors_name_the_field(services: Services, fields: dict, field: str | None) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chat(services, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(err.value) == (field or "response_format.json_schema")


async def test_complete_takes_a_constraint_in_sampling_params(services: Services) -> None:
    request = tokenizer_pb2.CompleteRequest(
        prompt="Pick:", sampling_params=engine_pb2.SamplingParams(max_tokens=8, choice={"choices": ["left", "right"]})
    )
    text = ""
    async for response in chat_stub(services).Complete(request, timeout=60):
        text += response.text
    assert text in ("left", "right")
