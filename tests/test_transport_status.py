"""Transport-level statuses over real sockets (issue 11): the stream limit never throttles health or
load, a burst ends only OK or RESOURCE_EXHAUSTED, unparseable bodies are INVALID_ARGUMENT naming the
message type, health List is served, log lines stay bounded."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_service.config import EngineConfig
from engine_service.core.engine import LLMEngine
from engine_service.server import SERVICE_NAME as ENGINE_SERVICE
from engine_service.server import EngineServer, start_engine_server
from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2
from service_common.logging import KeyValueFormatter
from service_common.server import ServerConfig
from tokenizer_service.server import start_tokenizer_server

# A body whose field 1 (request_id / text / service: a `string` in every request used here) is not UTF-8.
INVALID_UTF8_BODY = b"\x0a\x02\xff\xfe"


async def engine(model: Path, server: ServerConfig | None = None, **options) -> EngineServer:
    options = {"device": "cpu", "num_kv_blocks": 64, **options}
    running = await start_engine_server(
        lambda: LLMEngine(EngineConfig(model=str(model), **options)), str(model), config=server
    )
    await running.wait_until_ready()
    return running


def long_request(request_id: str) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=[1, 2, 3],
        sampling_params=engine_pb2.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True),
    )


@pytest.fixture
async def limited_engine(tiny_checkpoint: Path) -> AsyncIterator[EngineServer]:
    running = await engine(tiny_checkpoint, ServerConfig(max_concurrent_streams=2))
    yield running
    await running.stop(0)


async def test_stream_limit_is_resource_exhausted_and_never_throttles_health_or_load(limited_engine) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited_engine.port}") as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        streams = [stub.Generate(long_request(f"s{i}")) for i in range(2)]
        for call in streams:
            assert (await call.read()).token_ids  # both running
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(long_request("third")):
                pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 2" in info.value.details() and "--max-concurrent-streams" in info.value.details()
        # Saturated, yet everything but generation answers.
        for _ in range(5):
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=ENGINE_SERVICE), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert (await stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=5)).num_running == 2
            assert (await stub.GetModelInfo(engine_pb2.GetModelInfoRequest(), timeout=5)).max_model_len > 0
        assert (await stub.Abort(engine_pb2.AbortRequest(request_id="s0"), timeout=5)).aborted
        for call in streams:
            call.cancel()
        # Slots come back when streams end.
        await asyncio.sleep(0.2)
        async for response in stub.Generate(
            engine_pb2.GenerateRequest(prompt_token_ids=[1, 2], sampling_params=engine_pb2.SamplingParams(max_tokens=2))
        ):
            last = response
        assert last.finish_reason == engine_pb2.FINISH_REASON_LENGTH


async def test_burst_ends_only_ok_or_resource_exhausted(tiny_checkpoint: Path) -> None:
    """grpc core's pending-call limits (1,000 soft, 3,000 hard) used to cancel the excess of a burst
    before any handler ran: CANCELLED, with no log line (2,000 calls: ~200 of them)."""
    running = await engine(tiny_checkpoint, max_waiting_requests=8)
    codes: collections.Counter[str] = collections.Counter()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)

            async def one() -> None:
                try:
                    async for _ in stub.Generate(
                        engine_pb2.GenerateRequest(
                            prompt_token_ids=[1, 2, 3], sampling_params=engine_pb2.SamplingParams(max_tokens=2)
                        )
                    ):
                        pass
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

            await asyncio.gather(*(one() for _ in range(2500)))
    finally:
        await running.stop(0)
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, dict(codes)
    assert codes["OK"] > 0 and codes["RESOURCE_EXHAUSTED"] > 0, dict(codes)


@pytest.fixture
async def both_servers(demo_checkpoint: Path, tokenizer) -> AsyncIterator[tuple[str, str]]:
    running = await engine(demo_checkpoint)
    front = await start_tokenizer_server(tokenizer, f"127.0.0.1:{running.port}")
    yield f"127.0.0.1:{running.port}", f"127.0.0.1:{front.port}"
    await front.stop(0)
    await running.stop(0)


@pytest.mark.parametrize(
    "server, method, streaming, type_name",
    [
        (0, "/qwen3serve.engine.v1.EngineService/Generate", True, "qwen3serve.engine.v1.GenerateRequest"),
        (0, "/qwen3serve.engine.v1.EngineService/Abort", False, "qwen3serve.engine.v1.AbortRequest"),
        (0, "/grpc.health.v1.Health/Check", False, "grpc.health.v1.HealthCheckRequest"),
        (1, "/qwen3serve.tokenizer.v1.TokenizerService/Tokenize", False, "qwen3serve.tokenizer.v1.TokenizeRequest"),
        (1, "/qwen3serve.tokenizer.v1.TokenizerService/Chat", True, "qwen3serve.tokenizer.v1.ChatRequest"),
    ],
)
async def test_unparseable_body_is_invalid_argument_naming_the_type(
    both_servers, server: int, method: str, streaming: bool, type_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with grpc.aio.insecure_channel(both_servers[server]) as channel:
        # No serializers: the raw bytes go as they are, as a hostile client would send them.
        call = (channel.unary_stream if streaming else channel.unary_unary)(method)(INVALID_UTF8_BODY, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if streaming:
                async for _ in call:
                    pass
            else:
                await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert type_name in info.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_health_list_is_served(both_servers) -> None:
    for target, service in zip(both_servers, (ENGINE_SERVICE, "qwen3serve.tokenizer.v1.TokenizerService")):
        async with grpc.aio.insecure_channel(target) as channel:
            listed = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
        assert listed.statuses[service].status == health_pb2.HealthCheckResponse.SERVING
        assert "" in listed.statuses


async def test_a_multi_megabyte_request_id_never_lands_whole_in_a_log_line(
    both_servers, caplog: pytest.LogCaptureFixture
) -> None:
    huge = "r" * (3 * 2**20)
    caplog.set_level(logging.INFO)
    async with grpc.aio.insecure_channel(both_servers[1]) as channel:
        call = channel.unary_stream(
            "/qwen3serve.tokenizer.v1.TokenizerService/Complete",
            request_serializer=tokenizer_pb2.CompleteRequest.SerializeToString,
            response_deserializer=tokenizer_pb2.CompleteResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:  # an empty prompt: refused, and logged with the id
            async for _ in call(tokenizer_pb2.CompleteRequest(request_id=huge, prompt=""), timeout=30):
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    formatter = KeyValueFormatter()
    lines = [formatter.format(r) for r in caplog.records if getattr(r, "request_id", None) == huge]
    assert lines, "the refusal was not logged with its request id"
    assert all(len(line) < 10_000 for line in lines)
    assert all("more chars]" in line for line in lines)
