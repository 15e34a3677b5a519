"""The load ``bench/reliability.py`` puts on the servers: many streams at once over a few channels, and a fault
inflicted while they run."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import grpc
from reliability_servers import REPO  # noqa: F401  # first: puts the repository on sys.path

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc


def _chat(i: int, max_tokens: int) -> tokenizer_pb2.ChatRequest:
    return tokenizer_pb2.ChatRequest(
        messages=[tokenizer_pb2.ChatMessage(role="user", content=f"stream {i}: tell me a story")],
        sampling_params=engine_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )


def _generate(i: int, max_tokens: int) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(
        prompt_token_ids=[100 + i % 1000, 11, 1879],
        sampling_params=engine_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )


class Tally(NamedTuple):
    """What a set of streams ended with."""

    statuses: Counter  # status code name -> streams
    reasons: Counter  # the last message's finish reason -> streams
    first: list[float]  # seconds from the start to each stream's first message
    seconds: float  # from the start until every stream ended


async def open_streams(target: str, calls: int, make_call, channels: int = 10, timeout: float = 300) -> Tally:
    """Open ``calls`` streams at once over ``channels`` channels and wait for all of them to end."""
    statuses, reasons, first = Counter(), Counter(), []
    opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    start = time.perf_counter()

    async def one(i: int) -> None:
        last = None
        try:
            async for response in make_call(opened[i % channels], i, timeout):
                if last is None:
                    first.append(time.perf_counter() - start)
                last = response
            statuses["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            statuses[exc.code().name] += 1
        if last is not None and last.finish_reason:
            reasons[engine_pb2.FinishReason.Name(last.finish_reason)] += 1

    try:
        await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        for channel in opened:
            await channel.close()
    return Tally(statuses, reasons, first, time.perf_counter() - start)


def chat_call(max_tokens: int):
    return lambda ch, i, t: tokenizer_pb2_grpc.TokenizerServiceStub(ch).Chat(_chat(i, max_tokens), timeout=t)


def generate_call(max_tokens: int):
    return lambda ch, i, t: engine_pb2_grpc.EngineServiceStub(ch).Generate(_generate(i, max_tokens), timeout=t)


def fmt(counter: Counter) -> str:
    return ", ".join(f"{n} {k}" for k, n in counter.most_common()) or "none"


async def fault(streams: Callable[[], Awaitable[Tally]], inflict: Callable[[], None], after_s: float) -> Tally:
    """Run ``streams`` and ``inflict`` a fault once they have run ``after_s`` seconds."""
    task = asyncio.ensure_future(streams())
    await asyncio.sleep(after_s)
    inflict()
    return await task
