"""KV events, FlushCache and cache_salt over real loopback gRPC: the engine server on the demo model (CPU),
SubscribeKvEvents / FlushCache of SMG's ``VllmEngine``, Generate of ours, Complete of the tokenizer service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.smg import common_pb2
from qwen3serve.smg import vllm_engine_pb2_grpc as vllm_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tests.serving import Services, start_services

pytestmark = pytest.mark.timeout(120)

BS = 16  # the engine's default kv_block_size
PROMPT = [(7 * i + 3) % 500 + 10 for i in range(3 * BS + 5)]  # 3 full blocks and a partial one


@pytest_asyncio.fixture
async def services(demo_checkpoint: Path) -> AsyncIterator[Services]:
    services = await start_services(demo_checkpoint)
    try:
        yield services
    finally:
        await services.stop()


class Subscriber:
    """A SubscribeKvEvents stream, read batch by batch."""

    def __init__(self, channel: grpc.aio.Channel, start: int = 0) -> None:
        self.call = vllm_grpc.VllmEngineStub(channel).SubscribeKvEvents(
            common_pb2.SubscribeKvEventsRequest(start_sequence_number=start)
        )
        self.batches: list[common_pb2.KvEventBatch] = []

    async def until(self, predicate, what: str) -> None:
        while not predicate(self.events()):
            batch = await self.call.read()
            if batch is grpc.aio.EOF:
                raise AssertionError(f"the stream ended before {what}")
            self.batches.append(batch)

    def events(self) -> list[common_pb2.KvCacheEvent]:
        return [e for b in self.batches for e in b.events]

    def stored_blocks(self) -> list[common_pb2.KvBlock]:
        return [blk for e in self.events() if e.WhichOneof("data") == "stored" for blk in e.stored.blocks]


async def generate(channel: grpc.aio.Channel, prompt: list[int], salt: str = "") -> int:
    """Run ``prompt`` to its end (2 tokens); returns its cached_prompt_tokens."""
    stub = engine_pb2_grpc.EngineServiceStub(channel)
    request = engine_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling_params=engine_pb2.SamplingParams(max_tokens=2), cache_salt=salt
    )
    cached = -1
    async for response in stub.Generate(request, timeout=60):
        if response.HasField("usage"):
            cached = response.usage.cached_prompt_tokens
    return cached


async def test_a_subscriber_sees_the_prompts_full_blocks_stored_in_numbered_batches(services: Services) -> None:
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        sub = Subscriber(channel, start=41)  # a resuming subscriber: numbering continues after its cursor
        await sub.until(lambda events: sub.batches, "the first batch")
        first = sub.batches[0]
        assert first.load.load_only and first.sequence_number == 41 and not first.events
        await sub.until(lambda events: any(e.WhichOneof("data") == "cleared" for e in events), "the snapshot")
        assert await generate(channel, PROMPT) == 0
        await sub.until(lambda events: len(sub.stored_blocks()) >= 3, "three stored blocks")
        blocks = sub.stored_blocks()
        assert [list(b.token_ids) for b in blocks[:3]] == [PROMPT[i * BS : (i + 1) * BS] for i in range(3)]
        assert all(b.block_size == BS for b in blocks)
        stored = [e.stored for e in sub.events() if e.WhichOneof("data") == "stored"]
        assert not stored[0].HasField("parent_block_hash")  # the prompt's first block starts a chain
        chain = [b.block_hash for b in blocks[:3]]
        assert len(set(chain)) == 3
        for s in stored[1:]:  # a later run of blocks names the one before it
            assert s.parent_block_hash == chain[chain.index(s.blocks[0].block_hash) - 1]
        with_events = [b.sequence_number for b in sub.batches if b.events]
        assert with_events == list(range(42, 42 + len(with_events)))  # one more per batch, after the cursor
        ids = [e.event_id for e in sub.events()]
        assert ids == sorted(set(ids))
        sub.call.cancel()


async def test_flush_cache_turns_a_hit_into_a_miss_and_tells_subscribers(services: Services) -> None:
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        assert await generate(channel, PROMPT) == 0
        assert await generate(channel, PROMPT) == 3 * BS  # a hit
        sub = Subscriber(channel)
        await sub.until(lambda events: any(e.WhichOneof("data") == "cleared" for e in events), "the snapshot")
        assert len(sub.stored_blocks()) >= 3  # the snapshot lists the cached blocks
        snapshot_batches = len(sub.batches)
        reply = await vllm_grpc.VllmEngineStub(channel).FlushCache(common_pb2.FlushCacheRequest(), timeout=10)
        assert reply.success, reply.message
        assert "dropped" in reply.message
        await sub.until(
            lambda events: any(
                e.WhichOneof("data") == "cleared" for b in sub.batches[snapshot_batches:] for e in b.events
            ),
            "the flush's cleared",
        )
        assert await generate(channel, PROMPT) == 0  # the same prompt misses now
        sub.call.cancel()


async def test_cache_salt_isolates_tenants_and_is_bounded(services: Services) -> None:
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        assert await generate(channel, PROMPT, salt="tenant-a") == 0
        assert await generate(channel, PROMPT, salt="tenant-b") == 0  # another salt: no shared block
        assert await generate(channel, PROMPT) == 0  # nor the unsalted cache
        assert await generate(channel, PROMPT, salt="tenant-a") == 3 * BS  # the same salt shares
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(channel, PROMPT, salt="x" * 257)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cache_salt" in err.value.details() and "256" in err.value.details()


async def test_the_tokenizer_service_passes_cache_salt_on(services: Services) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 8
    async with grpc.aio.insecure_channel(services.tokenizer_target) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)

        async def cached(salt: str) -> int:
            request = tokenizer_pb2.CompleteRequest(
                prompt=prompt, sampling_params=engine_pb2.SamplingParams(max_tokens=1), cache_salt=salt
            )
            usage = [r.usage for r in [r async for r in stub.Complete(request, timeout=60)] if r.HasField("usage")]
            return usage[-1].cached_prompt_tokens

        assert await cached("a") == 0
        assert await cached("b") == 0
        assert await cached("a") > 0
        chat = tokenizer_pb2.ChatRequest(
            messages=[tokenizer_pb2.ChatMessage(role="user", content=prompt)],
            sampling_params=engine_pb2.SamplingParams(max_tokens=1),
            cache_salt="c",
        )
        for _ in range(2):
            usage = [r.usage async for r in stub.Chat(chat, timeout=60) if r.HasField("usage")][-1]
        assert usage.cached_prompt_tokens > 0
