"""The real tokenizer server in front of the real engine server (CPU), over loopback sockets.

- Chat and Complete stream exactly the text that one-shot decoding of the engine's own greedy tokens
  gives (``tokenizers`` decode, skipping special tokens, as the service does), with no U+FFFD that
  one-shot decoding does not have. With the random-weight demo model on multilingual and emoji prompts,
  and with a scripted model (tests/serving.py) whose known output splits emoji, CJK and Arabic
  characters across tokens and holds a <think> block.
- An unset max_tokens stays unset: the engine runs to the model's length (as vLLM does).
- Cancelling a Chat stream aborts the engine request and every KV block returns.
- The tokenizer's health follows the real engine: SERVING, then NOT_SERVING once the engine stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2
from serving import Services, health_status, start_engine, start_services, wait_until, write_scripted_checkpoint

from clients import AsyncEngineClient, AsyncTokenizerClient
from qwen3serve.engine.v1 import engine_pb2
from tokenizer_service.chat_template import ChatTokenizer
from tokenizer_service.server import start_tokenizer_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_TOKENS = 24
CHAT_PROMPTS = [
    "用中文解释一下彩虹是怎么形成的。",
    "日本の首都はどこですか？桜🌸について教えて。",
    "مرحبا، كيف حالك اليوم؟",
    "🎉🔥👩‍👩‍👧‍👦 emoji party! 😂🙏🏽🧑🏿‍🚀",
]
COMPLETE_PROMPTS = [
    "彩虹🌈是怎么形成的？",
    "日本語で自己紹介してください。",
    "ما هي عاصمة المغرب؟ 🇲🇦",
    "😀😃😄😁😆😅🤣😂🙂🙃",
]

# The scripted model's output after each kind of prompt (tests/serving.py, write_scripted_checkpoint).
# Tokens must be distinct across scripts. 🦜 龘 𝄞 🧋 🐈‍⬛ 🎉 😺 ق ... span several byte-level tokens.
THINK_REASONING = "推理：彩虹🌈由阳光折射形成🦜"
THINK_ANSWER = "答案是的☀️🔬龘𝄞مرحبا بالعالم"
NO_THINK_ANSWER = "日本語のテキスト🗾、العربية🕌🚀🇯🇵🧋"
COMPLETION = "🐈‍⬛ 很可爱 🎉 ねこ 😺 قطة"
SCRIPTED_COMPLETE_PROMPT = "Continue in many scripts »"
SCRIPTED_MAX_MODEL_LEN = 96


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def template(
    tokenizer: ChatTokenizer, messages: list[dict[str, str]], enable_thinking: bool | None = None
) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=enable_thinking)[1]


def one_shot(tokenizer: ChatTokenizer, ids: list[int]) -> str:
    """What the service's detokenizer promises to stream in total: one decode of all ids."""
    return tokenizer.backend.decode(ids, skip_special_tokens=True)


def split_characters(tokenizer: ChatTokenizer, ids: list[int]) -> int:
    """Tokens that are not whole characters on their own (part of a character split across tokens)."""
    return sum("\ufffd" in tokenizer.backend.decode([i]) for i in ids)


async def engine_greedy(services: Services, prompt_ids: list[int], **sampling) -> tuple[list[int], object]:
    """The engine's own greedy output for these prompt ids, straight from EngineService.Generate."""
    ids, last = [], None
    async with AsyncEngineClient(services.engine_target) as engine:
        async for response in engine.generate(prompt_ids, temperature=0.0, **sampling):
            ids.extend(response.token_ids)
            last = response
    return ids, last


def assert_streamed(pieces: list[str], expected: str) -> None:
    assert "".join(pieces) == expected
    if "\ufffd" not in expected:
        assert not any("\ufffd" in p for p in pieces), f"a streamed piece has a broken character: {pieces}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo(demo_checkpoint: Path, tokenizer: ChatTokenizer) -> AsyncIterator[Services]:
    services = await start_services(demo_checkpoint, tokenizer, max_model_len=512, num_kv_blocks=64)
    yield services
    await services.stop()


@pytest.fixture(scope="module")
def scripted_checkpoint(
    demo_checkpoint: Path, tokenizer: ChatTokenizer, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    think_start = template(tokenizer, user("Think, then answer."))[-1]
    no_think_start = template(tokenizer, user("Answer."), enable_thinking=False)[-1]
    complete_start = tokenizer.encode(SCRIPTED_COMPLETE_PROMPT)[-1]
    scripts = {
        think_start: tokenizer.encode(f"<think>{THINK_REASONING}</think>{THINK_ANSWER}"),
        no_think_start: tokenizer.encode(NO_THINK_ANSWER),
        complete_start: tokenizer.encode(COMPLETION),
    }
    return write_scripted_checkpoint(demo_checkpoint, tmp_path_factory.mktemp("scripted"), scripts)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scripted(scripted_checkpoint: Path, tokenizer: ChatTokenizer) -> AsyncIterator[Services]:
    services = await start_services(
        scripted_checkpoint, tokenizer, max_model_len=SCRIPTED_MAX_MODEL_LEN, num_kv_blocks=32
    )
    yield services
    await services.stop()


# ---- random-weight demo model, multilingual prompts -----------------------------------------------
@pytest.mark.parametrize("prompt", CHAT_PROMPTS, ids=["zh", "ja", "ar", "emoji"])
async def test_chat_stream_equals_one_shot_decode(demo: Services, tokenizer: ChatTokenizer, prompt: str) -> None:
    async with AsyncTokenizerClient(demo.tokenizer_target) as client:
        responses = [r async for r in client.chat(user(prompt), temperature=0.0, max_tokens=MAX_TOKENS)]
    prompt_ids = template(tokenizer, user(prompt))
    ids, last = await engine_greedy(demo, prompt_ids, max_tokens=MAX_TOKENS)
    expected = one_shot(tokenizer, ids)
    assert expected.strip() and any(ord(c) > 127 for c in expected)  # the comparison is not vacuous
    # Whatever the model writes lands in text or reasoning_text; none of these outputs opens with <think>.
    assert not expected.lstrip().startswith("<think>")
    assert_streamed([r.reasoning_text + r.text for r in responses], expected)
    assert not any(r.reasoning_text for r in responses)
    final = responses[-1]
    assert final.finish_reason == last.finish_reason != engine_pb2.FINISH_REASON_UNSPECIFIED
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt_ids), len(ids))
    assert len(responses) > 1  # streamed, not one message at the end


@pytest.mark.parametrize("prompt", COMPLETE_PROMPTS, ids=["zh-emoji", "ja", "ar-flag", "emoji"])
async def test_complete_stream_equals_one_shot_decode(demo: Services, tokenizer: ChatTokenizer, prompt: str) -> None:
    async with AsyncTokenizerClient(demo.tokenizer_target) as client:
        responses = [r async for r in client.complete(prompt, temperature=0.0, max_tokens=MAX_TOKENS)]
    prompt_ids = tokenizer.encode(prompt)
    ids, last = await engine_greedy(demo, prompt_ids, max_tokens=MAX_TOKENS)
    expected = one_shot(tokenizer, ids)
    assert expected.strip() and any(ord(c) > 127 for c in expected)
    assert_streamed([r.text for r in responses], expected)
    final = responses[-1]
    assert final.finish_reason == last.finish_reason != engine_pb2.FINISH_REASON_UNSPECIFIED
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt_ids), len(ids))
    assert len(responses) > 1


# ---- scripted model: known output with characters split across tokens ---------------------------
async def test_scripted_model_splits_characters_across_tokens(scripted: Services, tokenizer: ChatTokenizer) -> None:
    """The premise of the scripted tests: the engine really generates the script, split characters included."""
    ids, last = await engine_greedy(scripted, tokenizer.encode(SCRIPTED_COMPLETE_PROMPT), max_tokens=40)
    assert ids == [*tokenizer.encode(COMPLETION), tokenizer.hf.convert_tokens_to_ids("<|im_end|>")]
    assert last.finish_reason == engine_pb2.FINISH_REASON_STOP
    assert split_characters(tokenizer, ids) >= 5


async def test_scripted_chat_streams_reasoning_and_answer(scripted: Services, tokenizer: ChatTokenizer) -> None:
    messages = user("Think, then answer.")
    async with AsyncTokenizerClient(scripted.tokenizer_target) as client:
        responses = [r async for r in client.chat(messages, temperature=0.0, max_tokens=40)]
    ids, _ = await engine_greedy(scripted, template(tokenizer, messages), max_tokens=40)
    assert one_shot(tokenizer, ids) == f"<think>{THINK_REASONING}</think>{THINK_ANSWER}"
    assert split_characters(tokenizer, ids) >= 4
    assert_streamed([r.reasoning_text for r in responses], THINK_REASONING)
    assert_streamed([r.text for r in responses], THINK_ANSWER)
    assert len(responses) > 5
    final = responses[-1]
    assert final.finish_reason == engine_pb2.FINISH_REASON_STOP and final.usage.completion_tokens == len(ids)


async def test_scripted_chat_without_thinking(scripted: Services, tokenizer: ChatTokenizer) -> None:
    messages = user("Answer.")
    async with AsyncTokenizerClient(scripted.tokenizer_target) as client:
        responses = [r async for r in client.chat(messages, enable_thinking=False, temperature=0.0, max_tokens=40)]
    ids, _ = await engine_greedy(scripted, template(tokenizer, messages, enable_thinking=False), max_tokens=40)
    assert one_shot(tokenizer, ids) == NO_THINK_ANSWER and split_characters(tokenizer, ids) >= 2
    assert_streamed([r.text for r in responses], NO_THINK_ANSWER)
    assert not any(r.reasoning_text for r in responses)
    assert responses[-1].finish_reason == engine_pb2.FINISH_REASON_STOP


async def test_scripted_complete(scripted: Services) -> None:
    async with AsyncTokenizerClient(scripted.tokenizer_target) as client:
        responses = [r async for r in client.complete(SCRIPTED_COMPLETE_PROMPT, temperature=0.0, max_tokens=40)]
    assert_streamed([r.text for r in responses], COMPLETION)
    assert len(responses) > 5
    assert responses[-1].finish_reason == engine_pb2.FINISH_REASON_STOP


async def test_unset_max_tokens_generates_up_to_the_model_length(scripted: Services, tokenizer: ChatTokenizer) -> None:
    """No max_tokens from the caller: the tokenizer leaves it unset and the engine uses max_model_len -
    prompt length (vLLM's behaviour), not some small default."""
    prompt_ids = tokenizer.encode(SCRIPTED_COMPLETE_PROMPT)
    async with AsyncTokenizerClient(scripted.tokenizer_target) as client:
        responses = [r async for r in client.complete(SCRIPTED_COMPLETE_PROMPT, temperature=0.0, ignore_eos=True)]
    final = responses[-1]
    room = SCRIPTED_MAX_MODEL_LEN - len(prompt_ids)
    assert final.finish_reason == engine_pb2.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == room
    # The script, <|im_end|> (skipped in text), then token 0 ("!") to the end.
    assert "".join(r.text for r in responses) == COMPLETION + "!" * (room - len(tokenizer.encode(COMPLETION)) - 1)


# ---- cancellation and health ---------------------------------------------------------------------
async def test_cancelled_chat_aborts_the_engine_request(demo: Services, tokenizer: ChatTokenizer) -> None:
    core = demo.core
    blocks = core.block_manager
    aborted: list[tuple[str, bool]] = []
    original = core.abort_request

    def spy(request_id: str, index: int | None = None):
        finals = original(request_id, index)
        aborted.append((request_id, bool(finals)))
        return finals

    core.abort_request = spy  # runs on the engine thread
    try:
        async with AsyncTokenizerClient(demo.tokenizer_target) as client:
            # No max_tokens and ignore_eos: ~490 tokens, far more than the few read before cancelling.
            stream = client.chat(user("写一个很长的故事 📖"), request_id="e2e-cancel", temperature=0.0, ignore_eos=True)
            async for response in stream:
                if response.text or response.reasoning_text:
                    break
            assert blocks.num_free_blocks < blocks.num_blocks  # the request holds KV cache now
            await stream.aclose()  # cancels the Chat call
            # the engine core knows the request by its internal id, not the client's label
            await wait_until(lambda: any(found for _, found in aborted), timeout=5, what="engine abort")
            await wait_until(lambda: blocks.num_free_blocks == blocks.num_blocks, timeout=5, what="every KV block free")
            async with AsyncEngineClient(demo.engine_target) as engine:
                load = await engine.load()
            assert (load.num_running, load.num_waiting, load.kv_cache_usage) == (0, 0, 0.0)
    finally:
        del core.abort_request


async def test_tokenizer_health_follows_the_real_engine(demo_checkpoint: Path, tokenizer: ChatTokenizer) -> None:
    engine = await start_engine(demo_checkpoint, num_kv_blocks=16, max_model_len=256)
    front = await start_tokenizer_server(tokenizer, f"127.0.0.1:{engine.port}", probe_interval_s=0.05)
    target = f"127.0.0.1:{front.port}"
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    engine_up = True
    try:
        await wait_until(lambda: front.probe.engine_serving is not None, what="first engine probe")
        assert await health_status(target) == serving
        assert await health_status(target, "") == serving
        await engine.stop(0)
        engine_up = False
        await wait_until(lambda: front.probe.engine_serving is False, what="engine down noticed")
        assert await health_status(target) == not_serving
        assert await health_status(target, "") == not_serving
    finally:
        await front.stop(0)
        if engine_up:
            await engine.stop(0)
