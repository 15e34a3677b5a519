"""The engine service with its engine in a child process (how the CLI serves), over loopback sockets.

Streamed greedy tokens equal the offline engine's; a cancelled stream's KV blocks return (seen through
GetLoad, as a load balancer would); a bad request is refused in the server process without reaching
the engine; killing the engine process turns health NOT_SERVING and requests UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_engine_server import collect, greedy_request, prompts

from engine_service import LLM, SamplingParams
from engine_service.config import EngineConfig
from engine_service.server import SERVICE_NAME, start_engine_server
from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.smg import vllm_engine_pb2, vllm_engine_pb2_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from service_common.errors import bad_request_field
from tokenizer_service.server import start_tokenizer_server


@pytest.fixture
async def served(tiny_checkpoint: Path):
    config = EngineConfig(model=str(tiny_checkpoint), device="cpu", num_kv_blocks=128)
    running = await start_engine_server(config, str(tiny_checkpoint))
    await running.wait_until_ready()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield running, engine_pb2_grpc.EngineServiceStub(channel), health_pb2_grpc.HealthStub(channel)
    await running.stop(0)


async def _load(stub) -> engine_pb2.GetLoadResponse:
    return await stub.GetLoad(engine_pb2.GetLoadRequest())


async def test_engine_runs_in_another_process_and_streams_offline_greedy(served, tiny_checkpoint: Path) -> None:
    running, stub, _ = served
    assert running.servicer.engine.engine is None  # nothing of the engine lives in this process
    assert running.servicer.engine._driver._process.pid != os.getpid()
    ps = prompts(4, seed=3)
    with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128) as llm:
        expected = [
            o.token_ids for o in llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        ]
    results = await asyncio.gather(*(collect(stub, greedy_request(p, 8)) for p in ps))
    assert [tokens for tokens, _ in results] == expected
    info = await stub.GetModelInfo(engine_pb2.GetModelInfoRequest())
    assert info.num_kv_blocks == 128 and info.vocab_size == 512


async def test_cancel_returns_kv_blocks_and_bad_input_is_refused(served) -> None:
    _, stub, _ = served
    call = stub.Generate(greedy_request(prompts(1, lo=30)[0], max_tokens=2000))
    async for _ in call:
        break
    assert (await _load(stub)).kv_cache_usage > 0
    call.cancel()
    for _ in range(250):
        load = await _load(stub)
        if load.kv_cache_usage == 0 and load.num_running == 0:
            break
        await asyncio.sleep(0.02)
    assert load.kv_cache_usage == 0 and load.num_running == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, greedy_request([1, 2, 10_000]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "10000" in err.value.details()


async def test_killed_engine_process_turns_health_not_serving(served) -> None:
    running, stub, health = served
    check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
    os.kill(running.servicer.engine._driver._process.pid, signal.SIGKILL)
    for _ in range(250):
        if (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.02)
    assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, greedy_request([1, 2, 3]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "exit code" in err.value.details()


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found.extend(int(c) for c in children)
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find the worker process")
async def test_tensor_parallel_engine_process_and_a_dying_worker(tiny_checkpoint: Path) -> None:
    """TP=2 (gloo) behind the service: greedy output as offline TP=1; a killed TP worker makes the engine
    report death (health NOT_SERVING, UNAVAILABLE) instead of hanging."""
    config = EngineConfig(model=str(tiny_checkpoint), device="cpu", num_kv_blocks=128, tensor_parallel_size=2)
    running = await start_engine_server(config, str(tiny_checkpoint))
    try:
        await running.wait_until_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub, health = engine_pb2_grpc.EngineServiceStub(channel), health_pb2_grpc.HealthStub(channel)
            ps = prompts(3, seed=5)
            with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128) as llm:
                expected = [
                    o.token_ids
                    for o in llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
                ]
            results = await asyncio.gather(*(collect(stub, greedy_request(p, 6)) for p in ps))
            assert [tokens for tokens, _ in results] == expected
            engine_pid = running.servicer.engine._driver._process.pid
            workers = [pid for pid in _children(engine_pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
            assert workers, "the engine process has no TP worker child"
            os.kill(workers[0], signal.SIGKILL)
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            for _ in range(500):  # the engine notices at its next step or idle poll
                if (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await collect(stub, greedy_request([1, 2, 3], 2))
                await asyncio.sleep(0.02)
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, greedy_request([1, 2, 3]))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)


async def test_load_failure_in_the_engine_process_names_the_cause(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    running = await start_engine_server(EngineConfig(model=str(tmp_path), device="cpu"), str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match=r"ConfigError: .*'architectures'.*Qwen3ForCausalLM"):
            await running.wait_until_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            status = await health_pb2_grpc.HealthStub(channel).Check(check)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await running.stop(0)


def test_pipe_form_of_outputs_round_trips() -> None:
    """Plain deltas (tokens only, one or more) travel as flat lists; finals and logprob-carrying deltas as objects;
    the server side gets the same outputs back (order within a step does not matter to streams)."""
    import pickle

    from engine_service.event_codec import decode_event, encode_event
    from engine_service.protocol import FinishReason, RequestOutput, StatsUpdate, StepOutputs, TokenLogprob

    outputs = [
        RequestOutput("a", [5]),
        RequestOutput("b", [6], [TokenLogprob(6, -0.5, ((6, -0.5), (7, -1.0)))]),
        RequestOutput("c", [7], None, True, FinishReason.LENGTH, 3, 4, 0, 0.01),
        RequestOutput("d", [1, 2]),
        RequestOutput("d", [3], index=2),  # another sample of "d"
    ]
    data = encode_event(StepOutputs(outputs, "stats"))  # type: ignore[arg-type]
    packed = pickle.loads(data)
    assert packed[1:4] == (["a", "d", "d"], [1, 2, 1], [5, 1, 2, 3])  # the plain deltas, flat
    assert packed[-1] == [0, 0, 2]  # and their sample indices
    event = decode_event(data)
    assert isinstance(event, StepOutputs) and event.stats == "stats"
    assert sorted(event.outputs, key=lambda o: (o.request_id, o.index)) == outputs
    assert decode_event(encode_event(StatsUpdate("x"))) == StatsUpdate("x")  # type: ignore[arg-type]


class _TwoArgError(Exception):
    """An exception whose ``__init__`` does not take its ``args``: its pickle cannot be rebuilt."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")


def test_request_failures_cross_the_pipe() -> None:
    """A RequestFailed that did not unpickle in the server process was dropped there, and its stream waited
    forever (a schema that does not compile, through SMG, until the client's timeout)."""
    from engine_service.event_codec import decode_event, encode_event
    from engine_service.protocol import EngineOverloadedError, RequestFailed
    from service_common.validation import FieldError

    event = decode_event(encode_event(RequestFailed("7", FieldError("json_schema", "does not compile: (("))))
    assert isinstance(event, RequestFailed) and event.internal_id == "7"
    assert isinstance(event.error, FieldError)
    assert (event.error.field, event.error.message) == ("json_schema", "does not compile: ((")
    event = decode_event(encode_event(RequestFailed("8", EngineOverloadedError("the waiting queue is full"))))
    assert isinstance(event, RequestFailed) and isinstance(event.error, EngineOverloadedError)
    event = decode_event(encode_event(RequestFailed("9", _TwoArgError("x", "y"))))  # still ends its stream
    assert isinstance(event, RequestFailed) and type(event.error) is RuntimeError and "x: y" in str(event.error)


UNCOMPILABLE = json.dumps({"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}})


async def test_a_schema_that_does_not_compile_is_invalid_argument_from_the_engine_process(
    demo_checkpoint: Path, tokenizer
) -> None:
    """The compile fails in the engine process's compile pool: every API answers INVALID_ARGUMENT with the
    compiler's words at once (bounded timeouts: the old failure was a hang), and no request stays behind."""
    config = EngineConfig(model=str(demo_checkpoint), device="cpu", num_kv_blocks=64, max_model_len=256)
    engine = await start_engine_server(config, str(demo_checkpoint))
    front = None
    try:
        await engine.wait_until_ready()
        front = await start_tokenizer_server(tokenizer, f"127.0.0.1:{engine.port}", probe_interval_s=0.05)
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as front_channel,
        ):
            ours = engine_pb2_grpc.EngineServiceStub(channel)
            vllm = vllm_engine_pb2_grpc.VllmEngineStub(channel)
            chat = tokenizer_pb2_grpc.TokenizerServiceStub(front_channel)
            calls = [
                (
                    ours.Generate(
                        engine_pb2.GenerateRequest(
                            prompt_token_ids=[9707, 11],
                            sampling_params=engine_pb2.SamplingParams(max_tokens=4, json_schema=UNCOMPILABLE),
                        ),
                        timeout=20,
                    ),
                    "sampling_params.json_schema",
                ),
                *(
                    (
                        vllm.Generate(
                            vllm_engine_pb2.GenerateRequest(
                                request_id=f"smg-{stream}",
                                tokenized=vllm_engine_pb2.TokenizedInput(input_ids=[9707, 11]),
                                sampling_params=vllm_engine_pb2.SamplingParams(max_tokens=4, json_schema=UNCOMPILABLE),
                                stream=stream,
                            ),
                            timeout=20,
                        ),
                        "sampling_params.json_schema",
                    )
                    for stream in (False, True)
                ),
                (
                    chat.Chat(
                        tokenizer_pb2.ChatRequest(
                            messages=[tokenizer_pb2.ChatMessage(role="user", content="Hi")],
                            response_format=tokenizer_pb2.ResponseFormat(type="json_schema", json_schema=UNCOMPILABLE),
                        ),
                        timeout=20,
                    ),
                    "response_format.json_schema",
                ),
                (
                    chat.Complete(
                        tokenizer_pb2.CompleteRequest(
                            prompt="Hi",
                            sampling_params=engine_pb2.SamplingParams(max_tokens=4, json_schema=UNCOMPILABLE),
                        ),
                        timeout=20,
                    ),
                    "sampling_params.json_schema",
                ),
            ]
            for call, field in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value)
                assert bad_request_field(err.value) == field
                assert "parenthesis is not closed" in (err.value.details() or ""), err.value.details()
            load = await ours.GetLoad(engine_pb2.GetLoadRequest())
            assert load.num_running + load.num_waiting == 0 and engine.servicer.engine.num_live_requests == 0
    finally:
        if front is not None:
            await front.stop(0)
        await engine.stop(0)
