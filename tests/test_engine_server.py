"""EngineService over real loopback sockets (CPU, the tiny fp32 model): streaming parity with the offline
engine, cancellation and deadlines returning KV blocks, 200 concurrent streams, the bad-input table,
Abort, GetModelInfo / GetLoad, backpressure and health transitions."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from engine_service import LLM, SamplingParams
from engine_service.config import EngineConfig
from engine_service.core.engine import LLMEngine
from engine_service.server import SERVICE_NAME, EngineServer, start_engine_server
from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from service_common.errors import bad_request_field


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


async def start(model: Path, **options) -> EngineServer:
    options = {"device": "cpu", "num_kv_blocks": 128, **options}
    running = await start_engine_server(lambda: LLMEngine(EngineConfig(model=str(model), **options)), str(model))
    await running.wait_until_ready()
    return running


@pytest.fixture
async def server(tiny_checkpoint: Path):
    running = await start(tiny_checkpoint)
    yield running
    await running.stop(0)


@pytest.fixture
async def stub(server: EngineServer):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield engine_pb2_grpc.EngineServiceStub(channel)


def greedy_request(prompt: list[int], max_tokens: int = 10, **extra) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        sampling_params=engine_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra),
    )


async def collect(stub, request) -> tuple[list[int], engine_pb2.GenerateResponse]:
    tokens, last = [], None
    async for response in stub.Generate(request):
        tokens.extend(response.token_ids)
        last = response
    return tokens, last


async def wait_for_free_blocks(server: EngineServer, timeout: float = 5.0) -> None:
    core = server.servicer.engine.engine
    deadline = asyncio.get_running_loop().time() + timeout
    while core.block_manager.num_free_blocks != core.block_manager.num_blocks:
        assert asyncio.get_running_loop().time() < deadline, "KV blocks were not returned"
        await asyncio.sleep(0.02)


async def test_streamed_tokens_equal_offline_greedy(stub, tiny_checkpoint: Path) -> None:
    ps = prompts(6, seed=1)
    with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128) as llm:
        expected = [
            o.token_ids for o in llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
        ]
    results = await asyncio.gather(*(collect(stub, greedy_request(p)) for p in ps))
    assert [tokens for tokens, _ in results] == expected
    for (_tokens, last), p in zip(results, ps):
        assert last.finish_reason == engine_pb2.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(p) and last.usage.completion_tokens == 10


async def test_logprobs_are_streamed(stub) -> None:
    tokens, _last = [], None
    async for response in stub.Generate(greedy_request(prompts(1)[0], 4, logprobs=3)):
        assert len(response.logprobs) == len(response.token_ids)
        for token, lp in zip(response.token_ids, response.logprobs):
            assert lp.token_id == token and len(lp.top_logprobs) == 3
            assert lp.top_logprobs[0].token_id == token  # greedy: the chosen token is the most likely
            assert lp.logprob == pytest.approx(lp.top_logprobs[0].logprob)
        tokens.extend(response.token_ids)
    assert len(tokens) == 4


async def test_cancelled_stream_returns_every_kv_block(server: EngineServer, stub) -> None:
    call = stub.Generate(greedy_request(prompts(1, lo=30)[0], max_tokens=2000))
    async for _ in call:
        break  # first tokens arrived: the request holds KV blocks now
    assert server.servicer.engine.engine.block_manager.num_free_blocks < 128
    call.cancel()
    await wait_for_free_blocks(server)


async def test_deadline_exceeded_stream_returns_every_kv_block(server: EngineServer, stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _with_deadline(stub, greedy_request(prompts(1, lo=30)[0], max_tokens=2000), 0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_for_free_blocks(server)


async def _with_deadline(stub, request, timeout: float):
    async for _ in stub.Generate(request, timeout=timeout):
        pass


async def test_two_hundred_concurrent_streams_complete(tiny_checkpoint: Path) -> None:
    running = await start(tiny_checkpoint, num_kv_blocks=512)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            results = await asyncio.gather(*(collect(stub, greedy_request(p, 8)) for p in prompts(200, seed=3)))
        assert all(
            len(tokens) == 8 and last.finish_reason == engine_pb2.FINISH_REASON_LENGTH for tokens, last in results
        )
        await wait_for_free_blocks(running)
    finally:
        await running.stop(0)


@pytest.mark.parametrize(
    ("prompt", "sampling", "field"),
    [
        ([], {}, "prompt_token_ids"),
        ([1, 2, 10**6], {}, "prompt_token_ids"),
        ([1] * 2048, {}, "prompt_token_ids"),
        ([1, 2], {"max_tokens": 5000}, "sampling_params.max_tokens"),
        ([1, 2], {"temperature": -1.0}, "sampling_params.temperature"),
        ([1, 2], {"top_p": 1.5}, "sampling_params.top_p"),
        ([1, 2], {"top_p": 0.0}, "sampling_params.top_p"),
        ([1, 2], {"top_k": -2}, "sampling_params.top_k"),
        ([1, 2], {"min_p": 1.5}, "sampling_params.min_p"),
        ([1, 2], {"logprobs": 1000}, "sampling_params.logprobs"),
        ([1, 2], {"stop_token_ids": [10**6]}, "sampling_params.stop_token_ids"),
    ],
)
async def test_bad_requests_are_invalid_argument_naming_the_field(stub, prompt, sampling, field) -> None:
    request = engine_pb2.GenerateRequest(prompt_token_ids=prompt, sampling_params=engine_pb2.SamplingParams(**sampling))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    assert bad_request_field(err.value) == field


async def test_bad_request_does_not_disturb_other_streams(stub) -> None:
    good = asyncio.ensure_future(collect(stub, greedy_request(prompts(1)[0], 20)))
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(stub, engine_pb2.GenerateRequest(prompt_token_ids=[]))
    tokens, last = await good
    assert len(tokens) == 20 and last.finish_reason == engine_pb2.FINISH_REASON_LENGTH


async def test_abort(server: EngineServer, stub) -> None:
    request = greedy_request(prompts(1)[0], max_tokens=2000)
    request.request_id = "to-abort"
    call = stub.Generate(request)
    async for _ in call:
        break
    assert (await stub.Abort(engine_pb2.AbortRequest(request_id="to-abort"))).aborted
    last = None
    async for response in call:
        last = response
    assert last.finish_reason == engine_pb2.FINISH_REASON_ABORTED
    await wait_for_free_blocks(server)
    # An ended request (and an unknown one) is not an error: aborted=false, as the proto documents.
    assert not (await stub.Abort(engine_pb2.AbortRequest(request_id="to-abort"))).aborted
    assert not (await stub.Abort(engine_pb2.AbortRequest(request_id="never-seen"))).aborted


async def test_abort_with_an_index_ends_that_sample_only(server: EngineServer, stub) -> None:
    request = greedy_request(prompts(1)[0], max_tokens=2000, n=3)
    request.request_id = "abort-one-sample"
    call = stub.Generate(request)
    seen: set[int] = set()
    async for response in call:
        seen.add(response.index)
        if len(seen) == 3:
            break
    with pytest.raises(grpc.aio.AioRpcError) as err:  # past the request's n: a caller's bug, named
        await stub.Abort(engine_pb2.AbortRequest(request_id="abort-one-sample", index=3))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_field(err.value) == "index"
    assert "3" in err.value.details()
    assert (await stub.Abort(engine_pb2.AbortRequest(request_id="abort-one-sample", index=1))).aborted
    assert not (await stub.Abort(engine_pb2.AbortRequest(request_id="abort-one-sample", index=1))).aborted
    finals: dict[int, engine_pb2.GenerateResponse] = {}
    tokens_after: dict[int, int] = {0: 0, 2: 0}  # the siblings' tokens after sample 1 ended
    aborted_rest = False
    async for response in call:
        if response.finish_reason:
            finals[response.index] = response
        elif 1 in finals and not aborted_rest:
            tokens_after[response.index] += len(response.token_ids)
            if min(tokens_after.values()) >= 3:  # both went on: now abort the rest (index unset)
                assert (await stub.Abort(engine_pb2.AbortRequest(request_id="abort-one-sample"))).aborted
                aborted_rest = True
    assert sorted(finals) == [0, 1, 2]
    assert {f.finish_reason for f in finals.values()} == {engine_pb2.FINISH_REASON_ABORTED}
    assert finals[1].usage.completion_tokens < min(finals[0].usage.completion_tokens, finals[2].usage.completion_tokens)
    await wait_for_free_blocks(server)
    assert not (await stub.Abort(engine_pb2.AbortRequest(request_id="abort-one-sample", index=0))).aborted


async def test_model_info_and_load(stub, tiny_checkpoint: Path) -> None:
    info = await stub.GetModelInfo(engine_pb2.GetModelInfoRequest())
    assert info.vocab_size == 512 and info.max_model_len == 2048 and info.num_kv_blocks == 128
    assert info.dtype == "float32" and info.tensor_parallel_size == 1 and info.attention_backend == "torch"
    assert list(info.eos_token_ids) == [511]
    load = await stub.GetLoad(engine_pb2.GetLoadRequest())
    assert load.num_running == 0 and load.kv_cache_usage == 0.0 and load.max_waiting == 1024


async def test_full_waiting_queue_is_resource_exhausted(tiny_checkpoint: Path) -> None:
    running = await start(tiny_checkpoint, max_waiting_requests=1, max_num_seqs=1, max_num_batched_tokens=64)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            results = await asyncio.gather(
                *(collect(stub, greedy_request(p, 30)) for p in prompts(6)), return_exceptions=True
            )
        codes = {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)}
        assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert any(not isinstance(r, BaseException) for r in results)
    finally:
        await running.stop(0)


async def test_health_goes_serving_then_not_serving_when_the_engine_dies(tiny_checkpoint: Path) -> None:
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_load() -> LLMEngine:
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()
        return LLMEngine(EngineConfig(model=str(tiny_checkpoint), device="cpu", num_kv_blocks=64))

    running = await start_engine_server(slow_load, str(tiny_checkpoint))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, greedy_request([1, 2, 3]))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            gate.set()
            await running.wait_until_ready()
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
            # A step that fails kills the engine: health must say so and new streams get UNAVAILABLE.
            core = running.servicer.engine.engine

            def broken(*_args, **_kwargs):
                raise RuntimeError("simulated GPU failure")

            core.runner.execute = broken
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, greedy_request([1, 2, 3]))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            for _ in range(50):
                if (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await running.stop(0)


async def test_stream_interval_groups_tokens_after_the_first(tiny_checkpoint: Path) -> None:
    ps = prompts(3, seed=12)
    with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128) as llm:
        expected = [
            o.token_ids for o in llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True))
        ]
    running = await start_engine_server(
        lambda: LLMEngine(EngineConfig(model=str(tiny_checkpoint), device="cpu", num_kv_blocks=128)),
        str(tiny_checkpoint),
        stream_interval=4,
    )
    itl_count = ("qwen3serve_inter_token_latency_seconds_count", {"model_name": tiny_checkpoint.name})
    itl_before = REGISTRY.get_sample_value(*itl_count) or 0.0
    try:
        await running.wait_until_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)

            async def messages(prompt: list[int]) -> list[engine_pb2.GenerateResponse]:
                return [r async for r in stub.Generate(greedy_request(prompt, 11, logprobs=0))]

            streams = await asyncio.gather(*(messages(p) for p in ps))
    finally:
        await running.stop(0)
    for stream, want in zip(streams, expected):
        assert [t for r in stream for t in r.token_ids] == want
        assert [len(r.logprobs) for r in stream] == [len(r.token_ids) for r in stream]
        # 4 at a time after the first message (more where a slow reader folded messages; DeltaBatcher's own
        # tests show that the first token is sent alone)
        assert all(len(r.token_ids) >= 4 for r in stream[1:-1])
        assert len(stream) <= 4 and stream[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
    # every token after the first message is one inter-token observation, however the tokens were grouped
    assert REGISTRY.get_sample_value(*itl_count) - itl_before == sum(
        len(want) - len(stream[0].token_ids) for stream, want in zip(streams, expected)
    )
    with pytest.raises(ValueError, match="stream_interval must be an int >= 1, got 0"):
        await start_engine_server(lambda: None, str(tiny_checkpoint), stream_interval=0)  # type: ignore[arg-type]
