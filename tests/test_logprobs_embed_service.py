"""Prompt logprobs and Embed over gRPC (CPU, the fp32 demo model with the real Qwen3 tokenizer): EngineService
Generate/Embed, SMG's VllmEngine Generate/Embed, the tokenizer service's Complete; errors naming the field.

References are transformers' fp32 ``AutoModelForCausalLM`` / ``AutoModel`` on the same checkpoint; tolerances
as in tests/test_prompt_logprobs.py (1e-3 on a logprob) and tests/test_embed.py (1e-4 per element of a
normalised embedding). Responses carry fp32 floats, which round-trip a float exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from serving import Services, start_services
from test_embed import assert_embedding, hf_embedding
from test_prompt_logprobs import TOL, hf_logprobs

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.smg import vllm_engine_pb2 as vllm_pb
from qwen3serve.smg import vllm_engine_pb2_grpc as vllm_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from service_common.errors import bad_request_field
from tokenizer_service.chat_template import ChatTokenizer

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_MODEL_LEN = 128
PROMPT = [9707, 11, 1879, 0, 358, 1079, 264, 1273, 13]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services(demo_checkpoint: Path, tokenizer: ChatTokenizer) -> AsyncIterator[Services]:
    running = await start_services(
        demo_checkpoint,
        tokenizer,
        max_model_len=MAX_MODEL_LEN,
        num_kv_blocks=64,
        max_num_batched_tokens=32,
        max_num_seqs=16,
    )
    yield running
    await running.stop()


def engine_stub(services: Services, channel: grpc.aio.Channel) -> engine_pb2_grpc.EngineServiceStub:
    return engine_pb2_grpc.EngineServiceStub(channel)


def check_prompt_logprobs(path: Path, prompt: list[int], entries, k: int) -> None:
    ref = hf_logprobs(path, prompt)
    assert [e.token_id for e in entries] == prompt[1:]
    for i, e in enumerate(entries):
        assert abs(e.logprob - ref[i, prompt[i + 1]].item()) <= TOL
        assert [t.token_id for t in e.top_logprobs] == ref[i].topk(k).indices.tolist()


async def test_generate_returns_prompt_logprobs_on_the_first_message(services: Services, demo_checkpoint: Path) -> None:
    prompt = PROMPT * 5  # 45 tokens: two prefill chunks of the 32-token budget
    sampling = engine_pb2.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=3)
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        call = engine_pb2_grpc.EngineServiceStub(channel).Generate(
            engine_pb2.GenerateRequest(prompt_token_ids=prompt, sampling_params=sampling)
        )
        messages = [m async for m in call]
    assert len(messages[0].prompt_logprobs) == len(prompt) - 1
    assert all(not m.prompt_logprobs for m in messages[1:])
    check_prompt_logprobs(demo_checkpoint, prompt, messages[0].prompt_logprobs, 3)
    assert messages[-1].usage.cached_prompt_tokens == 0


async def test_embed_matches_transformers_amid_generation(services: Services, demo_checkpoint: Path) -> None:
    """Several Embed calls on both APIs at once with Generate streams running: each equals transformers'."""
    prompts = [PROMPT[: n + 1] for n in range(len(PROMPT))] + [PROMPT * 6]
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        ours, smg = engine_pb2_grpc.EngineServiceStub(channel), vllm_grpc.VllmEngineStub(channel)
        sampling = engine_pb2.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

        async def generate(i: int) -> int:
            call = ours.Generate(engine_pb2.GenerateRequest(prompt_token_ids=PROMPT[i:], sampling_params=sampling))
            return sum([len(m.token_ids) async for m in call])

        results = await asyncio.gather(
            *(generate(i) for i in range(3)),
            *(
                ours.Embed(engine_pb2.EmbedRequest(request_id=f"e{i}", prompt_token_ids=p))
                for i, p in enumerate(prompts)
            ),
            *(
                smg.Embed(vllm_pb.EmbedRequest(request_id=f"s{i}", tokenized=vllm_pb.TokenizedInput(input_ids=p)))
                for i, p in enumerate(prompts[-3:])
            ),
        )
    assert results[:3] == [24, 24, 24]
    embedded, smg_embedded = results[3 : 3 + len(prompts)], results[3 + len(prompts) :]
    for i, (prompt, response) in enumerate(zip(prompts, embedded)):
        assert response.request_id == f"e{i}" and response.prompt_tokens == len(prompt)
        assert_embedding(list(response.embedding), hf_embedding(demo_checkpoint, prompt), f"Embed {len(prompt)}")
    for prompt, response in zip(prompts[-3:], smg_embedded):
        assert response.prompt_tokens == len(prompt) and response.embedding_dim == 128
        assert_embedding(list(response.embedding), hf_embedding(demo_checkpoint, prompt), "VllmEngine.Embed")
    core = services.core
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


async def test_embed_normalize_false(services: Services, demo_checkpoint: Path) -> None:
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        response = await engine_pb2_grpc.EngineServiceStub(channel).Embed(
            engine_pb2.EmbedRequest(prompt_token_ids=PROMPT, normalize=False)
        )
    assert response.request_id  # made up by the engine
    ref = hf_embedding(demo_checkpoint, PROMPT, normalize=False)
    assert_embedding(list(response.embedding), ref, "normalize=false", normalized=False)


async def test_smg_generate_returns_input_logprobs(services: Services, demo_checkpoint: Path) -> None:
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        smg = vllm_grpc.VllmEngineStub(channel)
        request = vllm_pb.GenerateRequest(
            request_id="smg-plp",
            tokenized=vllm_pb.TokenizedInput(input_ids=PROMPT),
            sampling_params=vllm_pb.SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2),
        )
        (reply,) = [m async for m in smg.Generate(request)]
        request.stream, request.request_id = True, "smg-plp-stream"
        chunks = [m async for m in smg.Generate(request)]
    lp = reply.complete.input_logprobs
    assert list(lp.token_ids) == PROMPT and not lp.token_logprobs[0].HasField("value")
    ref = hf_logprobs(demo_checkpoint, PROMPT)
    for i in range(1, len(PROMPT)):
        assert abs(lp.token_logprobs[i].value - ref[i - 1, PROMPT[i]].item()) <= TOL
        assert list(lp.top_logprobs[i].token_ids) == ref[i - 1].topk(2).indices.tolist()
    assert chunks[0].chunk.input_logprobs == lp
    assert not any(c.chunk.HasField("input_logprobs") for c in chunks[1:])


async def test_complete_returns_prompt_logprobs(
    services: Services, tokenizer: ChatTokenizer, demo_checkpoint: Path
) -> None:
    text = "Once upon a time, in a land far away"
    prompt = tokenizer.encode(text)
    async with grpc.aio.insecure_channel(services.tokenizer_target) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        call = stub.Complete(
            tokenizer_pb2.CompleteRequest(
                prompt=text, sampling_params=engine_pb2.SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1)
            )
        )
        messages = [m async for m in call]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            chat = stub.Chat(
                tokenizer_pb2.ChatRequest(
                    messages=[tokenizer_pb2.ChatMessage(role="user", content="hi")],
                    sampling_params=engine_pb2.SamplingParams(prompt_logprobs=1),
                )
            )
            [m async for m in chat]
    check_prompt_logprobs(demo_checkpoint, prompt, messages[0].prompt_logprobs, 1)
    assert all(not m.prompt_logprobs for m in messages[1:])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(err.value) == "sampling_params.prompt_logprobs"


@pytest.mark.parametrize(
    "rpc, request_fields, field",
    [
        ("Embed", dict(prompt_token_ids=[]), "prompt_token_ids"),
        ("Embed", dict(prompt_token_ids=[1] * MAX_MODEL_LEN), "prompt_token_ids"),
        ("Embed", dict(prompt_token_ids=[200_000]), "prompt_token_ids"),
        ("Embed", dict(request_id="x" * 1000, prompt_token_ids=[1]), "request_id"),
        (
            "Generate",
            dict(prompt_token_ids=[1], sampling_params={"prompt_logprobs": 21}),
            "sampling_params.prompt_logprobs",
        ),
        ("SmgEmbed", dict(tokenized={"input_ids": []}), "tokenized.input_ids"),
        ("SmgEmbed", dict(tokenized={"input_ids": [1] * MAX_MODEL_LEN}), "tokenized.input_ids"),
        ("SmgGenerate", dict(sampling_params={"prompt_logprobs": -1}), "sampling_params.prompt_logprobs"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    services: Services, rpc: str, request_fields: dict, field: str
) -> None:
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        ours, smg = engine_pb2_grpc.EngineServiceStub(channel), vllm_grpc.VllmEngineStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if rpc == "Embed":
                await ours.Embed(engine_pb2.EmbedRequest(**request_fields))
            elif rpc == "Generate":
                [m async for m in ours.Generate(engine_pb2.GenerateRequest(**request_fields))]
            elif rpc == "SmgEmbed":
                await smg.Embed(vllm_pb.EmbedRequest(request_id="bad", **request_fields))
            else:
                request = vllm_pb.GenerateRequest(
                    request_id="bad", tokenized=vllm_pb.TokenizedInput(input_ids=[1]), **request_fields
                )
                [m async for m in smg.Generate(request)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert bad_request_field(err.value) == field, err.value.details()
