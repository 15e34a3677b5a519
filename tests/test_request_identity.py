"""Request identity over real sockets: a client's request_id is a label, never the engine's routing key.

The defect (issue 11, item 1): cancel a stream labelled X, start another labelled X at once, and the new
stream received the old request's final ABORTED message and one of its tokens while the new request ran
orphaned. Here every round ends a request labelled X in one of three ways (client cancel, deadline,
Abort), then reuses X at once; the new stream must get exactly its own greedy tokens, ending LENGTH, and
the KV pool must be full at the end. A second live request with the same label is ALREADY_EXISTS.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from serving import Services, start_services, wait_until

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tokenizer_service.chat_template import ChatTokenizer

# `make test` runs 150 rounds of each (50 per ending); `make soak` runs the 1,000.
ROUNDS = int(os.environ.get("QWEN3SERVE_REUSE_ROUNDS", "150"))
ENDINGS = ("cancel", "deadline", "abort")
NEW_TOKENS = 3


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services(demo_checkpoint: Path, tokenizer: ChatTokenizer) -> AsyncIterator[Services]:
    running = await start_services(demo_checkpoint, tokenizer, max_model_len=256, num_kv_blocks=64)
    yield running
    await running.stop()


def _generate_request(label: str, prompt: list[int], max_tokens: int) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(
        request_id=label,
        prompt_token_ids=prompt,
        sampling_params=engine_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )


def _chat_request(label: str, text: str, max_tokens: int) -> tokenizer_pb2.ChatRequest:
    return tokenizer_pb2.ChatRequest(
        request_id=label,
        messages=[tokenizer_pb2.ChatMessage(role="user", content=text)],
        sampling_params=engine_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )


async def _end_early(call, ending: str, abort) -> None:
    """Read the first message of ``call``, then end it by ``ending``: cancel, its deadline, or Abort."""
    if ending == "deadline":  # the call was made with a short deadline: wait for it to pass
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return
    async for _ in call:
        break
    if ending == "cancel":
        call.cancel()
    else:
        assert await abort()


async def _drain(call) -> list:
    return [response async for response in call]


@pytest.mark.timeout(600)
async def test_generate_request_id_reuse_after_cancel_deadline_and_abort(services: Services) -> None:
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        reuse_prompt = [9707, 11, 1879, 0]
        expected = [
            t for r in await _drain(stub.Generate(_generate_request("", reuse_prompt, NEW_TOKENS))) for t in r.token_ids
        ]
        assert len(expected) == NEW_TOKENS
        for i in range(ROUNDS):
            ending, label = ENDINGS[i % 3], f"reused-{i % 7}"
            old = stub.Generate(
                _generate_request(label, [100 + i % 50, 7, 8], 200), timeout=0.05 if ending == "deadline" else None
            )
            await _end_early(old, ending, lambda: _abort(stub, label))
            responses = await _drain(stub.Generate(_generate_request(label, reuse_prompt, NEW_TOKENS)))
            assert [t for r in responses for t in r.token_ids] == expected, f"round {i} ({ending})"
            assert [r.finish_reason for r in responses][-1] == engine_pb2.FINISH_REASON_LENGTH, f"round {i}"
            assert all(r.finish_reason == engine_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
            assert {r.request_id for r in responses} == {label}
    blocks = services.core.block_manager
    await wait_until(lambda: blocks.num_free_blocks == blocks.num_blocks, what="every KV block free")


async def _abort(stub, label: str) -> bool:
    return (await stub.Abort(engine_pb2.AbortRequest(request_id=label))).aborted


@pytest.mark.timeout(600)
async def test_chat_request_id_reuse_after_cancel_deadline_and_abort(services: Services) -> None:
    async with (
        grpc.aio.insecure_channel(services.tokenizer_target) as front,
        grpc.aio.insecure_channel(services.engine_target) as engine_channel,
    ):
        chat = tokenizer_pb2_grpc.TokenizerServiceStub(front)
        engine = engine_pb2_grpc.EngineServiceStub(engine_channel)
        expected = "".join(
            r.text + r.reasoning_text for r in await _drain(chat.Chat(_chat_request("", "hello", NEW_TOKENS)))
        )
        for i in range(ROUNDS):
            ending, label = ENDINGS[i % 3], f"chat-{i % 5}"
            old = chat.Chat(
                _chat_request(label, f"a long story number {i}", 200), timeout=0.1 if ending == "deadline" else None
            )
            await _end_early(old, ending, lambda: _abort(engine, label))
            responses = await _drain(chat.Chat(_chat_request(label, "hello", NEW_TOKENS)))
            assert "".join(r.text + r.reasoning_text for r in responses) == expected, f"round {i} ({ending})"
            assert responses[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH, f"round {i} ({ending})"
            assert responses[-1].usage.completion_tokens == NEW_TOKENS
    blocks = services.core.block_manager
    await wait_until(lambda: blocks.num_free_blocks == blocks.num_blocks, what="every KV block free")


async def test_a_second_live_request_with_the_same_id_is_already_exists(services: Services) -> None:
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        first = stub.Generate(_generate_request("twice", [1, 2, 3], 200))
        async for _ in first:
            break
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _drain(stub.Generate(_generate_request("twice", [4, 5, 6], 4)))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "twice" in err.value.details()
        # the first is untouched: it runs to its end, and Abort of an ended request is aborted=false
        rest = await _drain(first)
        assert rest[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
        assert not await _abort(stub, "twice")
        assert not await _abort(stub, "never-used")


async def test_abort_frees_the_label_at_once(services: Services) -> None:
    """After Abort answers aborted=true the label is free, even before the aborted stream is read to its end."""
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        old = stub.Generate(_generate_request("fast", [1, 2, 3], 200))
        async for _ in old:
            break
        assert await _abort(stub, "fast")
        new = await asyncio.wait_for(_drain(stub.Generate(_generate_request("fast", [4, 5, 6], 2))), 30)
        assert (
            new[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
            and len(new[-1].token_ids) + sum(len(r.token_ids) for r in new[:-1]) == 2
        )
        old_rest = await _drain(old)
        assert old_rest[-1].finish_reason == engine_pb2.FINISH_REASON_ABORTED
