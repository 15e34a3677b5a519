"""Sampling controls through both services (CPU, the demo model with the real Qwen3 tokenizer): logit_bias,
allowed_token_ids, bad_words, min_tokens, truncate_prompt_tokens on EngineService.Generate and forwarded by
Chat/Complete; include_stop_str_in_output and matched_stop on the tokenizer service; errors naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from serving import Services, start_services

from clients import AsyncEngineClient, AsyncTokenizerClient
from engine_service.limits import RequestLimits
from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2
from service_common.errors import bad_request_field
from tokenizer_service.chat_template import ChatTokenizer

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = [9707, 11, 1879, 0, 358, 1079]
MAX_MODEL_LEN = 256


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services(demo_checkpoint: Path, tokenizer: ChatTokenizer) -> AsyncIterator[Services]:
    running = await start_services(demo_checkpoint, tokenizer, max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)
    yield running
    await running.stop()


async def generate(services: Services, prompt: list[int] = PROMPT, **sampling) -> tuple[list[int], object]:
    ids, last = [], None
    async with AsyncEngineClient(services.engine_target) as engine:
        async for response in engine.generate(prompt, **sampling):
            ids.extend(response.token_ids)
            last = response
    return ids, last


async def complete(services: Services, prompt: str, **kwargs) -> tuple[str, object]:
    text, last = "", None
    async with AsyncTokenizerClient(services.tokenizer_target) as client:
        async for response in client.complete(prompt, **kwargs):
            text += response.text
            last = response
    return text, last


# ---- the engine API -----------------------------------------------------------------------------------


async def test_logit_bias_bans_and_forces_tokens(services: Services) -> None:
    plain, _ = await generate(services, temperature=0.0, max_tokens=12, ignore_eos=True)
    banned = dict.fromkeys(set(plain), -100.0)
    for seed in range(4):
        ids, _ = await generate(services, temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True, logit_bias=banned)
        assert not set(ids) & set(banned)
    greedy, _ = await generate(services, temperature=0.0, max_tokens=12, ignore_eos=True, logit_bias=banned)
    assert not set(greedy) & set(banned)
    forced, _ = await generate(
        services, temperature=1.0, seed=1, max_tokens=12, ignore_eos=True, logit_bias={4321: 100.0}
    )
    assert forced == [4321] * 12


async def test_allowed_token_ids_and_bad_words(services: Services) -> None:
    allowed = [100, 200, 300, 151645]  # 151645: <|im_end|>, an EOS id; allowed, so it may end the output
    for seed in range(4):
        ids, _ = await generate(services, temperature=1.0, seed=seed, max_tokens=16, allowed_token_ids=allowed)
        assert ids and set(ids) <= set(allowed)
    plain, _ = await generate(services, temperature=0.0, max_tokens=12, ignore_eos=True)
    pairs = {tuple(plain[i : i + 2]) for i in range(len(plain) - 1)}
    ids, _ = await generate(
        services, temperature=0.0, max_tokens=12, ignore_eos=True, bad_words=[list(p) for p in pairs]
    )
    assert ids != plain
    assert not {tuple(ids[i : i + 2]) for i in range(len(ids) - 1)} & pairs


async def test_min_tokens_bans_stop_ids_and_eos(services: Services) -> None:
    first = (await generate(services, temperature=0.0, max_tokens=1))[0][0]
    ids, last = await generate(
        services, temperature=0.0, max_tokens=8, min_tokens=3, stop_token_ids=[first], logit_bias={151645: 100.0}
    )  # EOS forced, but banned for 3 tokens
    assert ids[0] != first and len(ids) == 4 and ids[3] == 151645
    assert last.finish_reason == engine_pb2.FINISH_REASON_STOP


async def test_truncate_prompt_tokens_keeps_the_last_ones(services: Services) -> None:
    long_prompt = [(i * 37) % 5000 + 10 for i in range(MAX_MODEL_LEN + 50)]  # over the model's length
    ids, last = await generate(
        services, long_prompt, temperature=0.0, max_tokens=6, ignore_eos=True, truncate_prompt_tokens=20
    )
    assert last.usage.prompt_tokens == 20
    assert ids == (await generate(services, long_prompt[-20:], temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    _, last = await generate(services, temperature=0.0, max_tokens=2, truncate_prompt_tokens=1000)
    assert last.usage.prompt_tokens == len(PROMPT)  # longer than the prompt: all of it


LIMITS = RequestLimits()


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"logit_bias": {5: 100.5}}, "sampling_params.logit_bias[5]"),
        ({"logit_bias": {5: float("nan")}}, "sampling_params.logit_bias[5]"),
        ({"logit_bias": {10**6: 1.0}}, "sampling_params.logit_bias[1000000]"),
        # over the count limit: refused as such before any entry is looked at (every bias is out of range too)
        ({"logit_bias": dict.fromkeys(range(LIMITS.max_logit_bias + 1), 500.0)}, "sampling_params.logit_bias"),
        ({"allowed_token_ids": [1, 10**6]}, "sampling_params.allowed_token_ids"),
        ({"allowed_token_ids": list(range(LIMITS.max_allowed_token_ids + 1))}, "sampling_params.allowed_token_ids"),
        ({"bad_words": [[1], [2, 10**6]]}, "sampling_params.bad_words[1]"),
        ({"bad_words": [[1], []]}, "sampling_params.bad_words[1]"),
        ({"bad_words": [[1]] * (LIMITS.max_bad_words + 1)}, "sampling_params.bad_words"),
        ({"bad_words": [[1], [2] * (LIMITS.max_bad_word_tokens + 1)]}, "sampling_params.bad_words[1]"),
        ({"truncate_prompt_tokens": 0}, "sampling_params.truncate_prompt_tokens"),
        ({"allowed_token_ids": [7, 8], "bad_words": [[7], [8]]}, "sampling_params.allowed_token_ids"),
        (
            {"allowed_token_ids": [151645, 9], "stop_token_ids": [9], "min_tokens": 1},
            "sampling_params.allowed_token_ids",
        ),
    ],
)
async def test_bad_controls_are_invalid_argument_naming_the_field(services: Services, sampling, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(services, max_tokens=2, **sampling)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert bad_request_field(err.value) == field, err.value.details()
    if sampling.get("logit_bias") and len(sampling["logit_bias"]) > LIMITS.max_logit_bias:
        assert "limit" in err.value.details()


async def test_truncation_comes_before_the_length_rule(services: Services) -> None:
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        request = engine_pb2.GenerateRequest(
            prompt_token_ids=[7] * (MAX_MODEL_LEN + 10), sampling_params=engine_pb2.SamplingParams(max_tokens=2)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(request):
                pass
        assert bad_request_field(err.value) == "prompt_token_ids"
        request.sampling_params.truncate_prompt_tokens = MAX_MODEL_LEN - 2
        responses = [r async for r in stub.Generate(request)]
        assert responses[-1].usage.prompt_tokens == MAX_MODEL_LEN - 2


# ---- through the tokenizer service ------------------------------------------------------------------


async def test_complete_forwards_the_controls(services: Services, tokenizer: ChatTokenizer) -> None:
    (a,) = tokenizer.encode("a")
    text, last = await complete(services, "Once upon a time", max_tokens=5, allowed_token_ids=[a], ignore_eos=True)
    assert text == "aaaaa" and last.usage.completion_tokens == 5
    text, _ = await complete(
        services,
        "Once upon a time",
        temperature=0.0,
        max_tokens=5,
        ignore_eos=True,
        logit_bias={a: 100.0},
        bad_words=[[a, a, a]],
    )
    assert text.startswith("aa") and "aaa" not in text  # forced "a" until a third one would complete the word


async def test_chat_forwards_the_controls(services: Services, tokenizer: ChatTokenizer) -> None:
    (a,) = tokenizer.encode("a")
    text = ""
    async with AsyncTokenizerClient(services.tokenizer_target) as client:
        async for r in client.chat(
            [{"role": "user", "content": "Hi"}],
            enable_thinking=False,
            max_tokens=4,
            allowed_token_ids=[a],
            ignore_eos=True,
        ):
            text += r.text
    assert text == "aaaa"


async def test_truncate_prompt_tokens_through_complete(services: Services, tokenizer: ChatTokenizer) -> None:
    prompt = "word " * (MAX_MODEL_LEN + 20)
    _text, last = await complete(
        services, prompt, temperature=0.0, max_tokens=3, ignore_eos=True, truncate_prompt_tokens=30
    )
    assert last.usage.prompt_tokens == 30
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(services, prompt, max_tokens=3, truncate_prompt_tokens=0)
    assert bad_request_field(err.value) == "sampling_params.truncate_prompt_tokens"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(services, prompt, max_tokens=3)
    assert bad_request_field(err.value) == "prompt"


async def test_stop_string_is_reported_and_optionally_included(services: Services) -> None:
    kwargs = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}
    full, _ = await complete(services, "Once upon a time", **kwargs)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full.index(stop)
    assert stop.strip() and cut > 0
    async with AsyncTokenizerClient(services.tokenizer_target) as client:
        for include in (False, True):
            request = tokenizer_pb2.CompleteRequest(
                prompt="Once upon a time",
                stop=[stop, "never-in-output"],
                include_stop_str_in_output=include,
                sampling_params=engine_pb2.SamplingParams(**kwargs),
            )
            responses = [r async for r in client.stub.Complete(request)]
            text = "".join(r.text for r in responses)
            assert text == (full[: cut + len(stop)] if include else full[:cut])
            assert responses[-1].matched_stop == stop
            assert responses[-1].finish_reason == engine_pb2.FINISH_REASON_STOP
            assert all(not r.matched_stop for r in responses[:-1])
    text, last = await complete(services, "Once upon a time", stop=["never-in-output"], **kwargs)
    assert text == full and last.matched_stop == ""
