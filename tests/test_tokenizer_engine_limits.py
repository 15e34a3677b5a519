"""The tokenizer service in front of a real engine (demo model, CPU): a too-long prompt names the field
the caller sent, and nothing heavy runs on the event loop: while a maximal-size Tokenize and a maximal-size
Complete prompt are processed (the prompt then rejected as longer than the model), a concurrent Chat stream
keeps flowing and health checks answer at once. Engine and tokenizer servers over loopback sockets, all in
this process: a GIL held anywhere shows up as a gap."""

from __future__ import annotations

import asyncio
import itertools
import random
import string
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import Services, start_services
from test_tokenizer_limits import Msg, assert_rejected, chat_request, complete_request

from qwen3serve.engine.v1 import engine_pb2
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from service_common.errors import bad_request_field
from tokenizer_service.chat_template import ChatTokenizer
from tokenizer_service.config import RequestLimits
from tokenizer_service.server import SERVICE_NAME

MAX_GAP_S = 0.2  # largest pause between two messages of the running Chat stream
MAX_HEALTH_S = 0.1  # slowest health check


def maximal_text(limit: int) -> str:
    """Text of exactly ``limit`` UTF-8 bytes: words of random letters (many distinct BPE pieces)."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    text = " ".join(rng.choices(words, k=limit // 5))[:limit]
    return text + "x" * (limit - len(text))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo(demo_checkpoint: Path, tokenizer: ChatTokenizer) -> AsyncIterator[Services]:
    services = await start_services(demo_checkpoint, tokenizer, max_model_len=2048, num_kv_blocks=160)
    yield services
    await services.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_huge_requests_leave_streams_and_health_responsive(demo: Services, tokenizer: ChatTokenizer) -> None:
    text = maximal_text(RequestLimits().max_text_bytes)
    async with grpc.aio.insecure_channel(demo.tokenizer_target) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        chat = stub.Chat(
            tokenizer_pb2.ChatRequest(
                messages=[tokenizer_pb2.ChatMessage(role="user", content="Tell me a long story.")],
                sampling_params=engine_pb2.SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True),
            ),
            timeout=120,
        )
        arrivals: list[float] = []

        async def read_chat() -> None:
            async for _ in chat:
                arrivals.append(time.perf_counter())

        async def check_health(stop: asyncio.Event, latencies: list[float], statuses: set[int]) -> None:
            while not stop.is_set():
                start = time.perf_counter()
                response = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
                latencies.append(time.perf_counter() - start)
                statuses.add(response.status)
                await asyncio.sleep(0.02)

        async def complete_rejected() -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Complete(tokenizer_pb2.CompleteRequest(prompt=text), timeout=120):
                    pass
            return info.value

        reader = asyncio.create_task(read_chat())
        while len(arrivals) < 20:  # the stream is flowing
            assert not reader.done(), reader
            await asyncio.sleep(0.01)
        stop, latencies, statuses = asyncio.Event(), [], set()
        prober = asyncio.create_task(check_health(stop, latencies, statuses))
        start = time.perf_counter()
        tokenized, rejected = await asyncio.gather(
            stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=text), timeout=120), complete_rejected()
        )
        end = time.perf_counter()
        stop.set()
        await prober
        assert not reader.done(), "the Chat stream ended before the huge requests did: nothing was measured"
        chat.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    window = [start, *(t for t in arrivals if start < t < end), end]
    gaps = [b - a for a, b in itertools.pairwise(window)]
    assert max(gaps) < MAX_GAP_S, (
        f"largest gap {max(gaps) * 1000:.0f} ms while the huge requests ran ({end - start:.2f} s)"
    )
    assert len(window) > 10, f"{len(window)} messages in {end - start:.2f} s"
    assert len(latencies) > 5 and max(latencies) < MAX_HEALTH_S, (
        f"slowest health check {max(latencies) * 1000:.0f} ms of {len(latencies)}"
    )
    # A stalled loop also misses its own probes of the engine and reports NOT_SERVING for a while.
    assert statuses == {health_pb2.HealthCheckResponse.SERVING}
    assert len(tokenized.token_ids) > 100_000  # the work was real (about 500k tokens)
    assert rejected.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_field(rejected) == "prompt"
    assert "maximum length is 2048" in rejected.details()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("kind", ["chat", "complete"])
async def test_too_long_prompt_names_messages_or_prompt(demo: Services, kind: str) -> None:
    async with grpc.aio.insecure_channel(demo.tokenizer_target) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        text = "one two three " * 1000  # 3000 tokens and more, over the model's 2048
        request = (
            chat_request(messages=[Msg(role="user", content=text)]) if kind == "chat" else complete_request(prompt=text)
        )
        details = await assert_rejected(
            stub,
            request,
            "messages" if kind == "chat" else "prompt",
            "the prompt has ",
            "maximum length is 2048 tokens",
        )
        tokens = int(details.split("the prompt has ")[1].split()[0])
        assert tokens > 2048
        # A prompt that fits is served (the check is not off by one in the wrong direction).
        request = (
            chat_request(messages=[Msg(role="user", content="hi")]) if kind == "chat" else complete_request(prompt="hi")
        )
        request.sampling_params.CopyFrom(engine_pb2.SamplingParams(max_tokens=2, temperature=0))
        responses = [r async for r in (stub.Chat if kind == "chat" else stub.Complete)(request, timeout=30)]
        assert responses[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
