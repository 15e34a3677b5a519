"""Chat / Complete over real loopback sockets, against an in-test fake EngineService that plays a
scripted token stream: incremental text, reasoning split, stop strings, cancellation and deadlines
passed on to the engine, engine errors mapped to the same status codes, health following the engine.
(End-to-end tests against the real engine server: tests/test_end_to_end.py.)"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import AsyncTokenizerClient
from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from service_common import errors
from service_common.server import bind, build_server, set_serving
from tokenizer_service.chat_template import ChatTokenizer
from tokenizer_service.server import SERVICE_NAME, TokenizerServer, start_tokenizer_server

ENGINE = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name
MESSAGES = [{"role": "system", "content": "Think first."}, {"role": "user", "content": "Why is the sky blue? 为什么？"}]


class FakeEngineService(engine_pb2_grpc.EngineServiceServicer):
    """Plays ``script`` in chunks of ``chunk`` tokens; the last chunk carries ``finish`` and usage.

    ``hang_at``: stop before the token at this index and wait (until cancelled). ``error``: raised
    after ``error_at`` tokens. ``omit_finish``: end the stream without a finish reason (a broken engine).
    """

    def __init__(self) -> None:
        self.script: list[int] = []
        self.chunk = 2
        self.finish = engine_pb2.FINISH_REASON_LENGTH
        self.hang_at: int | None = None
        self.error: Exception | None = None
        self.error_at = 0
        self.omit_finish = False
        self.requests: list[engine_pb2.GenerateRequest] = []
        self.time_remaining: list[float | None] = []
        self.completed = 0  # streams that ran to their end
        self.closed_early = 0  # streams closed by the caller (cancel, deadline)
        self.closed = asyncio.Event()

    @errors.handle_errors
    async def Generate(
        self, request: engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        finished_normally = False
        try:
            for start in range(0, len(self.script) + 1, self.chunk):
                if self.error is not None and start >= self.error_at:
                    raise self.error
                if self.hang_at is not None and start + self.chunk > self.hang_at:
                    if start < self.hang_at:
                        yield engine_pb2.GenerateResponse(
                            request_id=request.request_id, token_ids=self.script[start : self.hang_at]
                        )
                    await asyncio.sleep(3600)
                ids = self.script[start : start + self.chunk]
                last = start + self.chunk >= len(self.script)
                if last and self.omit_finish:
                    break
                response = engine_pb2.GenerateResponse(request_id=request.request_id, token_ids=ids)
                if last:
                    response.finish_reason = self.finish
                    response.usage.CopyFrom(
                        engine_pb2.Usage(
                            prompt_tokens=len(request.prompt_token_ids),
                            completion_tokens=len(self.script),
                            cached_prompt_tokens=3,
                        )
                    )
                yield response
                await asyncio.sleep(0.001)  # let messages travel apart
                if last:
                    break
            finished_normally = True
        finally:
            self.completed += finished_normally
            self.closed_early += not finished_normally and self.error is None
            self.closed.set()


@pytest.fixture
async def engine() -> AsyncIterator[tuple[FakeEngineService, grpc.aio.Server, int]]:
    server, health = build_server([ENGINE])
    fake = FakeEngineService()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(fake, server)
    port = bind(server)
    await server.start()
    await set_serving(health, [ENGINE], True)
    yield fake, server, port
    await server.stop(0)


@pytest.fixture
async def tokenizer_server(tokenizer: ChatTokenizer, engine) -> AsyncIterator[TokenizerServer]:
    _, _, engine_port = engine
    running = await start_tokenizer_server(tokenizer, f"127.0.0.1:{engine_port}", probe_interval_s=0.05)
    yield running
    await running.stop(0)


@pytest.fixture
async def client(tokenizer_server: TokenizerServer) -> AsyncIterator[AsyncTokenizerClient]:
    async with AsyncTokenizerClient(f"127.0.0.1:{tokenizer_server.port}") as c:
        yield c


async def _collect(stream: AsyncIterator) -> list:
    return [r async for r in stream]


async def _wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_complete_streams_incremental_text(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer, engine
) -> None:
    fake, _, _ = engine
    text = "Il était une fois 一只猫 🐈‍⬛ qui aimait les émojis 👩‍👩‍👧 et les 漢字."
    fake.script = tokenizer.encode(text)
    responses = await _collect(
        client.complete(
            "Once upon a time", temperature=0.5, seed=7, max_tokens=64, stop_token_ids=[13], request_id="req-1"
        )
    )
    deltas = [r.text for r in responses]
    assert "".join(deltas) == tokenizer.hf.decode(fake.script, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)
    assert len(responses) > 5  # streamed, not buffered
    assert all(r.request_id == "req-1" for r in responses)
    assert all(r.finish_reason == engine_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == engine_pb2.FINISH_REASON_LENGTH and not last.matched_stop
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_prompt_tokens) == (
        len(tokenizer.hf("Once upon a time")["input_ids"]),
        len(fake.script),
        3,
    )
    (sent,) = fake.requests
    assert sent.request_id == "req-1"
    assert list(sent.prompt_token_ids) == tokenizer.hf("Once upon a time")["input_ids"]
    sp = sent.sampling_params
    assert sp.HasField("temperature") and sp.temperature == 0.5 and sp.seed == 7 and sp.max_tokens == 64
    assert list(sp.stop_token_ids) == [13] and not sp.HasField("top_p")
    assert fake.time_remaining == [None]  # no client deadline: none invented


async def test_concurrent_streams_and_generated_request_ids(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer, engine
) -> None:
    fake, _, _ = engine
    fake.script = tokenizer.encode("Concurrent 🎉 streams 并发")
    results = await asyncio.gather(*(_collect(client.complete(f"prompt {i}")) for i in range(6)))
    expected = tokenizer.hf.decode(fake.script)
    assert all("".join(r.text for r in rs) == expected for rs in results)
    ids = {rs[0].request_id for rs in results}
    assert len(ids) == 6 and "" not in ids
    assert ids == {r.request_id for r in fake.requests}


async def test_chat_renders_the_template_and_splits_reasoning(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer, engine
) -> None:
    fake, _, _ = engine
    output = (
        "<think>\nRayleigh scattering: 散射 ∝ 1/λ⁴ 🌈\n\nso blue wins.\n</think>\n\nBecause of Rayleigh scattering 🌤️."
    )
    fake.script = [*tokenizer.encode(output), tokenizer.hf.convert_tokens_to_ids("<|im_end|>")]
    fake.finish = engine_pb2.FINISH_REASON_STOP
    responses = await _collect(client.chat(MESSAGES, temperature=0.6))
    expected_ids = tokenizer.hf.apply_chat_template(copy.deepcopy(MESSAGES), add_generation_prompt=True)["input_ids"]
    assert list(fake.requests[0].prompt_token_ids) == expected_ids
    reasoning = "".join(r.reasoning_text for r in responses)
    answer = "".join(r.text for r in responses)
    # Qwen3's template renders our split exactly as it renders the raw output it splits itself.
    render = lambda assistant: tokenizer.hf.apply_chat_template([*MESSAGES, assistant], tokenize=False)  # noqa: E731
    assert render({"role": "assistant", "content": answer, "reasoning_content": reasoning}) == render(
        {"role": "assistant", "content": output}
    )
    assert "<think>" not in reasoning + answer and "<|im_end|>" not in answer
    first_answer = next(i for i, r in enumerate(responses) if r.text)
    assert first_answer > 0 and not any(r.reasoning_text for r in responses[first_answer + 1 :])
    assert responses[-1].finish_reason == engine_pb2.FINISH_REASON_STOP


async def test_chat_without_thinking(client: AsyncTokenizerClient, tokenizer: ChatTokenizer, engine) -> None:
    fake, _, _ = engine
    fake.script = tokenizer.encode("Short answer: 蓝色.")
    responses = await _collect(client.chat(MESSAGES, enable_thinking=False))
    expected_ids = tokenizer.hf.apply_chat_template(
        copy.deepcopy(MESSAGES), add_generation_prompt=True, enable_thinking=False
    )["input_ids"]
    assert list(fake.requests[0].prompt_token_ids) == expected_ids
    assert "".join(r.text for r in responses) == "Short answer: 蓝色."
    assert not any(r.reasoning_text for r in responses)


@pytest.mark.parametrize("method", ["complete", "chat"])
async def test_stop_string_ends_generation_and_cancels_the_engine(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer, engine, method: str
) -> None:
    fake, _, _ = engine
    text = "The answer is 42. END OF ANSWER and then more text"
    fake.script = tokenizer.encode(text)
    fake.chunk = 1
    fake.hang_at = len(fake.script)  # the engine would go on: the tokenizer must cancel it
    stream = (
        client.complete("Q", stop=["END OF", "never"])
        if method == "complete"
        else client.chat(MESSAGES, stop=["END OF", "never"], enable_thinking=False)
    )
    responses = await asyncio.wait_for(_collect(stream), timeout=10)
    assert "".join(r.text for r in responses) == text[: text.index("END OF")]
    assert not any("E" in r.text for r in responses)  # not even the stop string's first letter
    last = responses[-1]
    assert last.finish_reason == engine_pb2.FINISH_REASON_STOP and last.matched_stop == "END OF"
    stop_end = len(tokenizer.encode(text[: text.index("END OF") + len("END OF")]))
    assert stop_end <= last.usage.completion_tokens < len(fake.script)
    await _wait_until(lambda: fake.closed_early == 1)


async def test_client_cancel_cancels_the_engine_call(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer, engine
) -> None:
    fake, _, _ = engine
    fake.script = tokenizer.encode("<think>\nlong reasoning that never ends")
    fake.hang_at = 4
    stream = client.chat(MESSAGES)
    first = await stream.__anext__()
    assert first.reasoning_text
    await stream.aclose()  # cancels the call
    await _wait_until(lambda: fake.closed_early == 1)


async def test_deadline_is_passed_on_and_cancels_the_engine(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer, engine
) -> None:
    fake, _, _ = engine
    fake.script = tokenizer.encode("slow")
    fake.hang_at = 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(client.complete("Q", timeout=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (remaining,) = fake.time_remaining
    assert remaining is not None and 0 < remaining <= 0.6
    await _wait_until(lambda: fake.closed_early == 1)


@pytest.mark.parametrize(
    "error,code",
    [
        (
            errors.InvalidArgument("sampling_params.temperature", "must be >= 0, got -1.0"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (errors.Overloaded("waiting queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("engine dead"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("CUDA error: secret detail"), grpc.StatusCode.INTERNAL),
    ],
)
@pytest.mark.parametrize("error_at", [0, 2])
async def test_engine_errors_keep_their_status(
    client: AsyncTokenizerClient,
    tokenizer: ChatTokenizer,
    engine,
    error: Exception,
    code: grpc.StatusCode,
    error_at: int,
) -> None:
    fake, _, _ = engine
    fake.script = tokenizer.encode("some text here")
    fake.error, fake.error_at = error, error_at
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for response in client.chat(MESSAGES, enable_thinking=False):
            received.append(response)
    assert info.value.code() == code
    assert bool(received) == (error_at > 0)  # text before the error was delivered
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert errors.bad_request_field(info.value) == "sampling_params.temperature"
        assert info.value.details() == "sampling_params.temperature: must be >= 0, got -1.0"
    if code == grpc.StatusCode.INTERNAL:
        assert "secret" not in info.value.details()


async def test_engine_stream_without_finish_is_internal(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer, engine
) -> None:
    fake, _, _ = engine
    fake.script = tokenizer.encode("cut short")
    fake.omit_finish = True
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(client.complete("Q"))
    assert info.value.code() == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"logprobs": 2}, "sampling_params.logprobs"),
        ({"stop": ["ok", ""]}, "stop[1]"),
    ],
)
async def test_text_level_validation(client: AsyncTokenizerClient, engine, kwargs: dict, field: str) -> None:
    fake, _, _ = engine
    for stream in (client.chat(MESSAGES, **kwargs), client.complete("Q", **kwargs)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _collect(stream)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert errors.bad_request_field(info.value) == field
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(client.complete(""))
    assert errors.bad_request_field(info.value) == "prompt"
    assert fake.requests == []  # nothing reached the engine


async def test_health_follows_the_engine(
    client: AsyncTokenizerClient, tokenizer_server: TokenizerServer, engine
) -> None:
    _, engine_server, _ = engine
    health = health_pb2_grpc.HealthStub(client.channel)

    async def status() -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))).status

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    await _wait_until(lambda: tokenizer_server.probe.engine_serving is True)
    assert await status() == serving
    await engine_server.stop(0)
    await _wait_until(lambda: tokenizer_server.probe.engine_serving is False)
    assert await status() == not_serving
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(client.chat(MESSAGES))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_unset_max_tokens_is_left_to_the_engine(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer, engine
) -> None:
    """No max_tokens from the caller: none is invented (the engine then runs to the model's length, as
    vLLM does); one given is passed on as it is."""
    fake, _, _ = engine
    fake.script = tokenizer.encode("ok")
    await _collect(client.chat(MESSAGES, temperature=0.0))
    await _collect(client.complete("Q"))
    await _collect(client.complete("Q", max_tokens=3))
    unset_chat, unset_complete, given = (r.sampling_params for r in fake.requests)
    assert not unset_chat.HasField("max_tokens") and not unset_complete.HasField("max_tokens")
    assert unset_chat.HasField("temperature")  # the fields that were set did arrive
    assert given.HasField("max_tokens") and given.max_tokens == 3


async def test_chat_with_tools_returns_parsed_tool_calls(
    client: AsyncTokenizerClient, tokenizer: ChatTokenizer, engine
) -> None:
    fake, _, _ = engine
    output = 'I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    fake.script = [*tokenizer.encode(output), tokenizer.hf.convert_tokens_to_ids("<|im_end|>")]
    fake.finish = engine_pb2.FINISH_REASON_STOP
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    responses = await _collect(client.chat(MESSAGES, tools, enable_thinking=False))
    calls = [c for r in responses for c in r.tool_calls]
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert "".join(r.text for r in responses) == "I will look it up.\n"
    # Without tools in the request the same output is plain text, tags and all.
    fake.requests.clear()
    responses = await _collect(client.chat(MESSAGES, enable_thinking=False))
    assert "".join(r.text for r in responses) == output and not any(r.tool_calls for r in responses)
