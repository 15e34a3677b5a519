"""SubscribeKvEvents: what SMG's ``cache_aware`` policy and its liveness check read from a worker.

Each subscriber gets a load record at once (a ``load_only`` batch) and then about every second while the
engine is idle: SMG declares a worker unreachable after 2 s of silence on this stream. Batches of prefix-cache
events (blocks stored, removed, all cleared), numbered monotonically, travel on the same stream.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from qwen3serve.smg import common_pb2

if TYPE_CHECKING:
    from engine_service.server import EngineServicer

HEARTBEAT_S = 1.0


class KvEventStreams:
    """The subscribers of one engine server."""

    def __init__(self, base: EngineServicer) -> None:
        self.base = base
        self.last_sequence = 0  # the number of the last event batch published (0: none yet)

    def load(self, sample: int) -> common_pb2.EngineLoad:
        engine = self.base._live_engine()
        stats = engine.stats
        return common_pb2.EngineLoad(
            running_requests=stats.num_running,
            waiting_requests=stats.num_waiting,
            token_usage=stats.kv_cache_usage,
            sample=sample,
            load_only=True,
            cache_hit_rate=stats.prefix_cache_hit_rate,
        )

    async def subscribe(self, request: common_pb2.SubscribeKvEventsRequest) -> AsyncIterator[common_pb2.KvEventBatch]:
        samples = itertools.count(1)
        while True:
            yield common_pb2.KvEventBatch(
                sequence_number=self.last_sequence, timestamp=time.time(), load=self.load(next(samples))
            )
            await asyncio.sleep(HEARTBEAT_S)
