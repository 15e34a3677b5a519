"""SubscribeKvEvents: what SMG's ``cache_aware`` policy and its liveness check read from a worker.

Each stream gets a load record at once (a ``load_only`` batch), then the prefix cache's events as the
block manager records them (``engine_service/prefix_cache_link.py``): first a snapshot of the whole cache
(``cleared``, then every block a lookup can reach, parents first), then one batch per engine step. While
no event comes, a ``load_only`` heartbeat goes about every second: SMG declares a worker unreachable after
2 s of silence on this stream.

**Numbering.** Batches with events are numbered per stream, 1 more each, starting after the request's
``start_sequence_number``: the engine keeps no history to replay, so a resuming subscriber (SMG resumes
from the last number it applied) gets the snapshot under the next number, and since the snapshot starts
with ``cleared`` its index is exact again without a gap in the numbers it checks. ``load_only`` batches
repeat the last number sent on the stream. A stream whose subscriber reads too slowly is resynced the
same way (its backlog dropped, a fresh snapshot queued), never waited for.

**Hashes** are the block manager's chained hashes, signed 64-bit (``KvBlock.block_hash`` is an int64),
with each block's token ids and size and, on a run of blocks, the parent's hash: what SMG's positional
index needs to place the blocks. SMG computes its own content hashes from the token ids, so it routes
prompts that differ only in ``cache_salt`` alike; the engine itself never shares their blocks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

from engine_service.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KvCacheEvent
from qwen3serve.smg import common_pb2

if TYPE_CHECKING:
    from engine_service.server import EngineServicer

HEARTBEAT_S = 1.0
_DEVICE = common_pb2.KvCacheTier.KV_CACHE_TIER_DEVICE


def kv_cache_events(events: Iterable[KvCacheEvent], event_ids: Iterable[int]) -> list[common_pb2.KvCacheEvent]:
    """Our events as SMG's, numbered by ``event_ids``; consecutive stored blocks of one chain (each the
    parent of the next, one salt) travel as one ``KvBlocksStored``."""
    out: list[common_pb2.KvCacheEvent] = []
    ids = iter(event_ids)
    last: BlockStored | None = None
    for event in events:
        if isinstance(event, BlockStored):
            if last is not None and event.parent_hash == last.block_hash and event.cache_salt == last.cache_salt:
                blocks = out[-1].stored.blocks
            else:
                msg = common_pb2.KvCacheEvent(event_id=next(ids))
                msg.stored.tier = _DEVICE
                if event.parent_hash is not None:
                    msg.stored.parent_block_hash = event.parent_hash
                if event.cache_salt:
                    msg.stored.cache_salt = event.cache_salt
                out.append(msg)
                blocks = msg.stored.blocks
            blocks.add(block_hash=event.block_hash, token_ids=event.token_ids, block_size=event.block_size)
            last = event
            continue
        last = None
        if isinstance(event, BlockRemoved):
            if out and out[-1].WhichOneof("data") == "removed":
                out[-1].removed.block_hashes.append(event.block_hash)
            else:
                out.append(common_pb2.KvCacheEvent(event_id=next(ids)))
                out[-1].removed.block_hashes.append(event.block_hash)
                out[-1].removed.tier = _DEVICE
        elif isinstance(event, AllBlocksCleared):
            out.append(common_pb2.KvCacheEvent(event_id=next(ids), cleared=common_pb2.KvCacheCleared()))
    return out


class KvEventStreams:
    """The subscribers of one engine server."""

    def __init__(self, base: EngineServicer) -> None:
        self.base = base

    def load(self, sample: int, load_only: bool) -> common_pb2.EngineLoad:
        engine = self.base._live_engine()
        stats, info = engine.stats, engine.info
        return common_pb2.EngineLoad(
            running_requests=stats.num_running,
            waiting_requests=stats.num_waiting,
            token_usage=stats.kv_cache_usage,
            sample=sample,
            load_only=load_only,
            cache_hit_rate=stats.prefix_cache_hit_rate,
            max_total_num_tokens=info.num_kv_blocks * info.kv_block_size,
        )

    async def subscribe(self, request: common_pb2.SubscribeKvEventsRequest) -> AsyncIterator[common_pb2.KvEventBatch]:
        samples = itertools.count(1)
        event_ids = itertools.count(1)
        sequence = request.start_sequence_number  # the last number sent on this stream
        yield common_pb2.KvEventBatch(
            sequence_number=sequence, timestamp=time.time(), load=self.load(next(samples), True)
        )
        async with self.base._live_engine().prefix_cache.subscribe() as subscription:
            while True:
                events = await subscription.next_batch(HEARTBEAT_S)
                if events is None:
                    yield common_pb2.KvEventBatch(
                        sequence_number=sequence, timestamp=time.time(), load=self.load(next(samples), True)
                    )
                    continue
                sequence += 1
                yield common_pb2.KvEventBatch(
                    sequence_number=sequence,
                    timestamp=time.time(),
                    events=kv_cache_events(events, event_ids),
                    load=self.load(next(samples), False),
                )
