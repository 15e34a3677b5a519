"""n > 1 and priority through every front door (CPU, the demo model with the real Qwen3 tokenizer):
EngineService.Generate, SMG's VllmEngine.Generate, and the tokenizer service's Chat and Complete. Each
sample is streamed with its index and ends with its own finish reason and usage; with a seed, sample i
equals the n = 1 request with seed + i; a stop string ends its own sample only; cancelling ends every
sample; n over the limit is INVALID_ARGUMENT naming ``sampling_params.n``."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from serving import Services, start_services, wait_until

from clients import sampling_params
from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.smg import vllm_engine_pb2 as vpb
from qwen3serve.smg import vllm_engine_pb2_grpc as vpb_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from service_common.errors import bad_request_field
from tokenizer_service.chat_template import ChatTokenizer

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = [9707, 11, 1879, 0, 358, 1079, 264, 1293, 3364, 13, 576, 3364, 374, 911, 264, 2699, 429, 3937]
SAMPLED = dict(temperature=1.0, top_k=40, max_tokens=12, ignore_eos=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services(demo_checkpoint: Path, tokenizer: ChatTokenizer) -> AsyncIterator[Services]:
    running = await start_services(demo_checkpoint, tokenizer, max_model_len=256, num_kv_blocks=64, kv_block_size=16)
    yield running
    await running.stop()


async def generate(services: Services, n: int | None = None, priority: int = 0, **sampling) -> dict[int, list]:
    """EngineService.Generate: every message, by sample index."""
    by_index: dict[int, list] = defaultdict(list)
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        request = engine_pb2.GenerateRequest(
            prompt_token_ids=PROMPT, sampling_params=sampling_params(n=n, **sampling), priority=priority
        )
        async for response in engine_pb2_grpc.EngineServiceStub(channel).Generate(request):
            by_index[response.index].append(response)
    return by_index


def tokens(messages: list) -> list[int]:
    return [t for m in messages for t in m.token_ids]


async def complete(services: Services, prompt: str, stop: list[str] = (), n: int | None = None, **sampling):
    by_index: dict[int, list] = defaultdict(list)
    async with grpc.aio.insecure_channel(services.tokenizer_target) as channel:
        request = tokenizer_pb2.CompleteRequest(
            prompt=prompt, stop=list(stop), sampling_params=sampling_params(n=n, **sampling)
        )
        async for response in tokenizer_pb2_grpc.TokenizerServiceStub(channel).Complete(request):
            by_index[response.index].append(response)
    return by_index


def text(messages: list) -> str:
    return "".join(m.text for m in messages)


# ---- EngineService ----------------------------------------------------------------------------------


async def test_generate_streams_each_sample_with_its_index_and_seed(services: Services) -> None:
    by_index = await generate(services, n=3, seed=11, **SAMPLED)
    assert sorted(by_index) == [0, 1, 2]
    for i, messages in by_index.items():
        final = messages[-1]
        assert final.finish_reason == engine_pb2.FINISH_REASON_LENGTH  # every sample ends on its own
        assert [m.finish_reason for m in messages[:-1]] == [engine_pb2.FINISH_REASON_UNSPECIFIED] * (len(messages) - 1)
        assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(PROMPT), 12)
        alone = await generate(services, seed=11 + i, **SAMPLED)
        assert tokens(messages) == tokens(alone[0]), f"sample {i} differs from seed {11 + i} alone"
    assert by_index[1][-1].usage.cached_prompt_tokens == 16  # the prompt's full block, shared


async def test_cancelling_a_request_ends_every_sample_and_frees_every_block(services: Services) -> None:
    blocks = services.core.block_manager
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        call = engine_pb2_grpc.EngineServiceStub(channel).Generate(
            engine_pb2.GenerateRequest(
                prompt_token_ids=PROMPT, sampling_params=sampling_params(n=4, max_tokens=200, ignore_eos=True)
            )
        )
        seen: set[int] = set()
        async for response in call:
            seen.add(response.index)
            if len(seen) == 4:
                break
        assert blocks.num_free_blocks < blocks.num_blocks
        call.cancel()
    await wait_until(lambda: blocks.num_free_blocks == blocks.num_blocks, timeout=5, what="every KV block free")
    await wait_until(lambda: not services.core.has_unfinished_requests(), timeout=5, what="no sample left")


async def test_priority_reaches_the_engine_from_our_front_doors(services: Services) -> None:
    core = services.core
    seen: list[int] = []
    original = core.add_request

    def spy(request_id, prompt_token_ids, params, priority=0, cache_salt=""):
        seen.append(priority)
        return original(request_id, prompt_token_ids, params, priority, cache_salt)

    core.add_request = spy  # runs on the engine thread
    try:
        await generate(services, priority=-3, max_tokens=1)
        async with grpc.aio.insecure_channel(services.tokenizer_target) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            async for _ in stub.Complete(
                tokenizer_pb2.CompleteRequest(prompt="Hi", priority=5, sampling_params=sampling_params(max_tokens=1))
            ):
                pass
            chat = tokenizer_pb2.ChatRequest(
                messages=[tokenizer_pb2.ChatMessage(role="user", content="Hi")],
                priority=2,
                sampling_params=sampling_params(max_tokens=1),
            )
            async for _ in stub.Chat(chat):
                pass
    finally:
        del core.add_request
    assert seen == [-3, 5, 2]


@pytest.mark.parametrize("n", [17, 1000])
async def test_n_over_the_limit_is_invalid_argument_naming_the_field(services: Services, n: int) -> None:
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(services, n=n)
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_field(err.value) == "sampling_params.n"
        )
        assert "16" in err.value.details()  # the limit
        vllm = vpb_grpc.VllmEngineStub(channel)
        request = vpb.GenerateRequest(request_id="too-many", tokenized=vpb.TokenizedInput(input_ids=PROMPT))
        request.sampling_params.n = n
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in vllm.Generate(request):
                pass
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_field(err.value) == "sampling_params.n"
        )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(services, "Hi", n=n)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_field(err.value) == "sampling_params.n"


# ---- SMG's VllmEngine -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_vllm_engine_serves_n_with_one_complete_per_index(services: Services, stream: bool) -> None:
    request = vpb.GenerateRequest(request_id=f"smg-n-{stream}", tokenized=vpb.TokenizedInput(input_ids=PROMPT))
    request.stream = stream
    sp = request.sampling_params
    sp.n, sp.seed, sp.temperature, sp.top_k, sp.max_tokens, sp.ignore_eos = 2, 21, 1.0, 40, 12, True
    chunks: dict[int, list[int]] = defaultdict(list)
    completes = {}
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        async for response in vpb_grpc.VllmEngineStub(channel).Generate(request):
            if response.HasField("chunk"):
                chunks[response.chunk.index] += response.chunk.token_ids
            else:
                assert response.complete.index not in completes
                completes[response.complete.index] = response.complete
    assert sorted(completes) == [0, 1]
    for i in (0, 1):
        alone = tokens((await generate(services, seed=21 + i, **SAMPLED))[0])
        got = chunks[i] if stream else list(completes[i].output_ids)
        assert got == alone and (completes[i].finish_reason, completes[i].completion_tokens) == ("length", 12)
    assert bool(chunks) == stream


# ---- the tokenizer service --------------------------------------------------------------------------


async def test_complete_detokenizes_and_stops_each_sample_on_its_own(services: Services) -> None:
    seeds = (3, 4)
    refs = [text((await complete(services, "Once upon a time", seed=s, **SAMPLED))[0]) for s in seeds]
    # a stop string in sample 0's text and not in sample 1's: it ends sample 0 only
    stop = next(
        refs[0][k : k + 2]
        for k in range(1, len(refs[0]) - 1)
        if refs[0][k : k + 2].strip() and refs[0][k : k + 2] not in refs[1]
    )
    by_index = await complete(services, "Once upon a time", stop=[stop], n=2, seed=seeds[0], **SAMPLED)
    first, second = by_index[0], by_index[1]
    assert text(first) == refs[0][: refs[0].index(stop)] and first[-1].matched_stop == stop
    assert first[-1].finish_reason == engine_pb2.FINISH_REASON_STOP
    assert text(second) == refs[1] and second[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
    assert second[-1].usage.completion_tokens == 12 and not second[-1].matched_stop


async def test_a_sample_ended_by_a_stop_string_stops_generating_in_the_engine(services: Services) -> None:
    sampled = {**SAMPLED, "max_tokens": 48}  # room for the siblings to go on after sample 0's abort arrives
    seeds = (5, 6)
    refs = [text((await complete(services, "Once upon a time", seed=s, **sampled))[0]) for s in seeds]
    stop = next(  # early in sample 0's text, nowhere in sample 1's
        refs[0][k : k + 2]
        for k in range(1, len(refs[0]) - 1)
        if refs[0][k : k + 2].strip() and refs[0][k : k + 2] not in refs[1]
    )
    core = services.core
    aborted: list[tuple[int | None, list[int]]] = []  # (index asked, output tokens of each sample it ended)
    original = core.abort_request

    def spy(request_id: str, index: int | None = None):
        finals = original(request_id, index)
        aborted.append((index, [f.num_output_tokens for f in finals]))
        return finals

    core.abort_request = spy  # runs on the engine thread
    try:
        by_index = await complete(services, "Once upon a time", stop=[stop], n=2, seed=seeds[0], **sampled)
    finally:
        del core.abort_request
    first, second = by_index[0], by_index[1]
    assert first[-1].finish_reason == engine_pb2.FINISH_REASON_STOP and first[-1].matched_stop == stop
    assert first[-1].usage.completion_tokens < 48  # counted up to the stop string, not the engine's later tokens
    assert text(second) == refs[1] and second[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
    assert second[-1].usage.completion_tokens == 48
    # the engine was told to end sample 0 alone, and it had not run to max_tokens
    ended_early = [ended[0] for index, ended in aborted if index == 0 and ended]
    assert ended_early and ended_early[0] < 48, aborted
    await wait_until(lambda: not core.has_unfinished_requests(), timeout=5, what="no sample left")


async def test_chat_streams_n_samples_each_with_finish_reason_and_usage(services: Services) -> None:
    def chat_request(**sampling) -> tokenizer_pb2.ChatRequest:
        return tokenizer_pb2.ChatRequest(
            messages=[tokenizer_pb2.ChatMessage(role="user", content="Tell me a story")],
            sampling_params=sampling_params(**sampling),
        )

    async def chat(request: tokenizer_pb2.ChatRequest) -> dict[int, list]:
        by_index: dict[int, list] = defaultdict(list)
        async with grpc.aio.insecure_channel(services.tokenizer_target) as channel:
            async for response in tokenizer_pb2_grpc.TokenizerServiceStub(channel).Chat(request):
                by_index[response.index].append(response)
        return by_index

    by_index = await chat(chat_request(n=3, seed=30, **SAMPLED))
    assert sorted(by_index) == [0, 1, 2]
    for i, messages in by_index.items():
        final = messages[-1]
        assert final.finish_reason == engine_pb2.FINISH_REASON_LENGTH and final.usage.completion_tokens == 12
        alone = (await chat(chat_request(seed=30 + i, **SAMPLED)))[0]
        both = ["".join(m.reasoning_text + m.text for m in ms) for ms in (messages, alone)]
        assert both[0] == both[1], f"sample {i} differs from seed {30 + i} alone"


async def test_vllm_engine_stop_string_ends_its_own_sample_only(services: Services, tokenizer: ChatTokenizer) -> None:
    def request(n: int, seed: int, stop: str = "") -> vpb.GenerateRequest:
        r = vpb.GenerateRequest(
            request_id=f"smg-stop-{n}-{seed}-{stop!r}", tokenized=vpb.TokenizedInput(input_ids=PROMPT)
        )
        sp = r.sampling_params
        sp.n, sp.seed, sp.temperature, sp.top_k, sp.max_tokens, sp.ignore_eos = n, seed, 1.0, 40, 12, True
        if stop:
            sp.stop.append(stop)
        return r

    async def completes(r: vpb.GenerateRequest) -> dict[int, vpb.GenerateComplete]:
        async with grpc.aio.insecure_channel(services.engine_target) as channel:
            return {
                m.complete.index: m.complete
                async for m in vpb_grpc.VllmEngineStub(channel).Generate(r)
                if m.HasField("complete")
            }

    refs = [list((await completes(request(1, seed)))[0].output_ids) for seed in (40, 41)]
    ref_texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in refs]  # as SMG's request asks
    stop = next(
        ref_texts[0][k : k + 2]
        for k in range(1, len(ref_texts[0]) - 1)
        if ref_texts[0][k : k + 2].strip() and ref_texts[0][k : k + 2] not in ref_texts[1]
    )
    core = services.core
    aborted: list[int | None] = []
    original = core.abort_request

    def spy(request_id: str, index: int | None = None):
        aborted.append(index)
        return original(request_id, index)

    core.abort_request = spy  # runs on the engine thread
    try:
        got = await completes(request(2, 40, stop))
    finally:
        del core.abort_request
    assert (got[0].finish_reason, got[0].matched_stop_str) == ("stop", stop) and got[0].completion_tokens < 12
    assert (got[1].finish_reason, list(got[1].output_ids)) == ("length", refs[1])
    assert 0 in aborted  # sample 0 alone was aborted in the engine, at its stop string
    await wait_until(lambda: not core.has_unfinished_requests(), timeout=5, what="no sample left")
