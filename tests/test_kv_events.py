"""The prefix cache's KV events and cache_salt, from the block manager (the source of truth) up to the
service side's fan-out (engine_service/prefix_cache_link.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine_service.core.block_manager import BlockManager
from engine_service.core.sequence import Sequence
from engine_service.prefix_cache_link import PrefixCacheLink
from engine_service.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheFlushed,
    Command,
    EngineDeadError,
    FlushCache,
    KvCacheEvent,
    KvEvents,
    WatchKvEvents,
)
from engine_service.sampling_params import SamplingParams

BS = 4


def make_seq(tokens: list[int], rid: str = "r", salt: str = "") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(), seed=0, cache_salt=salt)


def compute(bm: BlockManager, seq: Sequence) -> bool:
    """A step that computes every known token of ``seq`` (False, nothing changed: the pool is short)."""
    if not bm.allocate(seq, seq.num_tokens):
        return False
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    return True


def run(bm: BlockManager, seq: Sequence) -> int:
    """Admit ``seq`` as the scheduler does (prefix hit, then compute the rest); returns the tokens hit."""
    hit = bm.match_prefix(seq)
    assert compute(bm, seq)
    return hit


def recording(num_blocks: int = 16) -> BlockManager:
    bm = BlockManager(num_blocks=num_blocks, block_size=BS)
    bm.record_events(True)
    return bm


class Index:
    """What a subscriber (SMG) rebuilds from the events: hash -> (parent hash, token ids)."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[int | None, tuple[int, ...]]] = {}

    def apply(self, events: list[KvCacheEvent]) -> None:
        for e in events:
            if isinstance(e, AllBlocksCleared):
                self.blocks.clear()
            elif isinstance(e, BlockStored):
                assert e.block_hash not in self.blocks, "stored twice without a removal"
                assert e.parent_hash is None or e.parent_hash in self.blocks, "a child before its parent"
                assert len(e.token_ids) == e.block_size == BS
                self.blocks[e.block_hash] = (e.parent_hash, e.token_ids)
            else:
                assert e.block_hash in self.blocks, "removed a hash never stored"
                del self.blocks[e.block_hash]

    def reachable(self) -> dict[int, tuple[int | None, tuple[int, ...]]]:
        """The blocks whose whole chain of parents is known (what a prefix lookup can reach)."""

        def ok(h: int) -> bool:
            while h is not None:
                if h not in self.blocks:
                    return False
                h = self.blocks[h][0]  # type: ignore[assignment]
            return True

        return {h: v for h, v in self.blocks.items() if ok(h)}


# ---- the block manager ------------------------------------------------------------------------------------
def test_nothing_is_recorded_until_someone_subscribes() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    run(bm, make_seq(list(range(9))))
    assert bm.take_events() == []
    bm.record_events(True)
    run(bm, make_seq(list(range(100, 109)), "b"))
    assert [type(e) for e in bm.take_events()] == [BlockStored, BlockStored]
    bm.record_events(False)
    run(bm, make_seq(list(range(200, 209)), "c"))
    assert bm.take_events() == []


def test_full_blocks_are_stored_with_their_tokens_and_chained_parents() -> None:
    bm = recording()
    seq = make_seq(list(range(10)))  # two full blocks, one partial
    run(bm, seq)
    events = bm.take_events()
    assert events == [
        BlockStored(events[0].block_hash, None, (0, 1, 2, 3), BS),  # type: ignore[union-attr]
        BlockStored(events[1].block_hash, events[0].block_hash, (4, 5, 6, 7), BS),  # type: ignore[union-attr]
    ]
    assert all(-(2**63) <= e.block_hash < 2**63 for e in events)  # type: ignore[union-attr]  # SMG's int64
    assert bm.take_events() == []  # taken once
    # the partial block fills with two outputs: it is stored then, chained to the second
    seq.output_token_ids += [10, 11]
    assert compute(bm, seq)
    (third,) = bm.take_events()
    assert third == BlockStored(third.block_hash, events[1].block_hash, (8, 9, 10, 11), BS)  # type: ignore[union-attr]


def test_a_hit_stores_nothing_and_an_identical_block_is_stored_once() -> None:
    bm = recording()
    run(bm, make_seq(list(range(9)), "a"))
    assert len(bm.take_events()) == 2
    assert run(bm, make_seq(list(range(9)), "b")) == 8
    assert bm.take_events() == []
    # two live copies computed side by side (neither hit the other): the second stays private
    c, d = make_seq(list(range(50, 59)), "c"), make_seq(list(range(50, 59)), "d")
    for seq in (c, d):
        bm.match_prefix(seq)
        assert bm.allocate(seq, seq.num_tokens)
    for seq in (c, d):
        assert compute(bm, seq)
    assert len(bm.take_events()) == 2


def test_eviction_removes_the_reused_hashes() -> None:
    bm = recording(num_blocks=4)
    a = make_seq([*range(8), 99], "a")  # 2 full blocks + 1 partial: 3 blocks
    run(bm, a)
    stored = [e.block_hash for e in bm.take_events()]  # type: ignore[union-attr]
    bm.free(a)
    b = make_seq(list(range(100, 115)), "b")  # 4 blocks: evicts everything cached
    run(bm, b)
    events = bm.take_events()
    removed = [e.block_hash for e in events if isinstance(e, BlockRemoved)]
    assert sorted(removed) == sorted(stored)
    assert events.index(BlockRemoved(removed[-1])) < next(i for i, e in enumerate(events) if isinstance(e, BlockStored))
    bm.free(b)
    assert run(bm, make_seq([*range(8), 99], "again")) == 0  # and a lookup misses: the events were true


def test_flush_drops_unused_blocks_clears_and_republishes_the_live_ones() -> None:
    bm = recording()
    idle = make_seq(list(range(9)), "idle")
    run(bm, idle)
    bm.free(idle)
    live = make_seq(list(range(100, 109)), "live")
    run(bm, live)
    bm.take_events()
    dropped, kept = bm.flush_cache()
    assert (dropped, kept) == (2, 2)
    events = bm.take_events()
    assert isinstance(events[0], AllBlocksCleared)
    assert [e.token_ids for e in events[1:]] == [(100, 101, 102, 103), (104, 105, 106, 107)]  # type: ignore[union-attr]
    assert run(bm, make_seq(list(range(9)), "idle again")) == 0  # it hit before the flush: a miss now
    assert run(bm, make_seq(list(range(100, 109)), "live again")) == 8  # blocks in use stayed cached
    bm.check_invariants()
    for seq in list(bm._seqs):
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks


def test_snapshot_lists_parents_first_and_skips_blocks_whose_parent_was_evicted() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = make_seq(list(range(13)), "a")  # 3 full + 1 partial
    run(bm, a)
    first = bm.block_table(a)[0]
    bm.free(a)
    snap = bm.snapshot_events()
    assert [e.token_ids for e in snap[1:]] == [tuple(range(i, i + 4)) for i in (0, 4, 8)]  # type: ignore[union-attr]
    bm._free.move_to_end(first, last=False)  # the LRU evicts tails first; make the first block go first
    assert bm.allocate(make_seq([7] * 4, "b"), 4)
    assert bm.snapshot_events() == [AllBlocksCleared()]  # a's first block is gone: its children are unreachable


@pytest.mark.parametrize("seed", range(3))
def test_a_subscriber_replaying_the_events_sees_exactly_what_a_lookup_can_reach(seed: int) -> None:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=24, block_size=BS)
    index = Index()
    live: list[Sequence] = []
    for step in range(600):
        if step == 50:  # subscribes late: starts from a snapshot
            bm.record_events(True)
            index.apply(bm.snapshot_events())
        op = rng.random()
        if op < 0.45 or not live:
            prefix = [rng.randrange(3)] * rng.choice([0, 4, 8, 12])
            seq = make_seq(prefix + [rng.randrange(20) for _ in range(rng.randrange(1, 9))], f"s{step}")
            seq.cache_salt = rng.choice(["", "", "t1"])
            bm.match_prefix(seq)
            if compute(bm, seq):
                live.append(seq)
            else:
                bm.free(seq)  # gives back its prefix hits
        elif op < 0.75:
            seq = rng.choice(live)
            seq.output_token_ids.append(rng.randrange(20))
            compute(bm, seq)
        elif op < 0.98:
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            bm.flush_cache()
        index.apply(bm.take_events())
        if step >= 50:
            expected = {e.block_hash: (e.parent_hash, e.token_ids) for e in bm.snapshot_events()[1:]}  # type: ignore[union-attr]
            assert index.reachable() == expected
        bm.check_invariants()


# ---- cache_salt -------------------------------------------------------------------------------------------
def test_two_salts_never_share_a_block_and_one_salt_does() -> None:
    bm = recording()
    prompt = list(range(9))
    assert run(bm, make_seq(prompt, "a", salt="tenant-a")) == 0
    salted = [e.block_hash for e in bm.take_events()]  # type: ignore[union-attr]
    assert run(bm, make_seq(prompt, "b", salt="tenant-b")) == 0
    assert run(bm, make_seq(prompt, "c")) == 0  # unsalted is its own tenant too
    others = [e.block_hash for e in bm.take_events()]  # type: ignore[union-attr]
    assert len(others) == 4 and not set(salted) & set(others)  # every hash differs, not only the first
    assert run(bm, make_seq(prompt, "a2", salt="tenant-a")) == 8
    assert run(bm, make_seq(prompt, "c2")) == 8


def test_the_salt_is_checked_even_when_hashes_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    monkeypatch.setattr(bm, "_chain_hash", lambda prev, ids: hash(ids))  # every salt hashes alike
    run(bm, make_seq(list(range(9)), "a", salt="x"))
    assert run(bm, make_seq(list(range(9)), "b", salt="y")) == 0
    assert run(bm, make_seq(list(range(9)), "c", salt="x")) == 8


def test_stored_events_carry_the_salt() -> None:
    bm = recording()
    run(bm, make_seq(list(range(5)), salt="s"))
    (event,) = bm.take_events()
    assert isinstance(event, BlockStored) and event.cache_salt == "s"


# ---- the fan-out --------------------------------------------------------------------------------------------
def stored(h: int) -> BlockStored:
    return BlockStored(h, None, (1, 2, 3, 4), BS)


async def test_a_subscriber_starts_from_its_snapshot_and_then_gets_every_batch() -> None:
    sent: list[Command] = []
    link = PrefixCacheLink(sent.append)
    sub = link.subscribe()
    assert sent == [WatchKvEvents(sub.id)]
    link.on_event(KvEvents([stored(1)]))  # before its snapshot: already in it
    link.on_event(KvEvents([AllBlocksCleared(), stored(1)], sub.id))
    link.on_event(KvEvents([stored(2)]))
    assert await sub.next_batch(1) == [AllBlocksCleared(), stored(1), stored(2)]  # what queued, as one batch
    assert await sub.next_batch(0.01) is None
    link.on_event(KvEvents([stored(3)]))
    assert await sub.next_batch(1) == [stored(3)]
    sub.close()
    assert sent[-1] == WatchKvEvents(None)  # the last one left: recording stops


async def test_a_slow_subscriber_is_resynced_without_holding_up_the_others() -> None:
    sent: list[Command] = []
    link = PrefixCacheLink(sent.append, max_batches=4)
    slow, fast = link.subscribe(), link.subscribe()
    for sub in (slow, fast):
        link.on_event(KvEvents([AllBlocksCleared()], sub.id))
    assert await fast.next_batch(1) == [AllBlocksCleared()]
    received: list[list[KvCacheEvent]] = []
    for h in range(10):
        link.on_event(KvEvents([stored(h)]))
        received.append(await fast.next_batch(1))  # type: ignore[arg-type]
    assert received == [[stored(h)] for h in range(10)]  # the fast one missed nothing
    assert slow.resyncs == 1 and sent[-1] == WatchKvEvents(slow.id)  # its backlog dropped, a snapshot asked
    assert slow.queue.empty()
    link.on_event(KvEvents([stored(10)]))  # superseded by the coming snapshot
    link.on_event(KvEvents([AllBlocksCleared(), stored(0)], slow.id))
    assert await slow.next_batch(1) == [AllBlocksCleared(), stored(0)]
    assert await fast.next_batch(1) == [stored(10)]  # and not the slow one's snapshot
    assert await fast.next_batch(0.01) is None


async def test_flush_waits_for_the_engine_and_fails_when_it_dies() -> None:
    sent: list[Command] = []
    link = PrefixCacheLink(sent.append)
    task = asyncio.ensure_future(link.flush())
    await asyncio.sleep(0)
    assert sent == [FlushCache(0)]
    link.on_event(CacheFlushed(0, 3, 1))
    assert (await task).dropped == 3
    task = asyncio.ensure_future(link.flush())
    await asyncio.sleep(0)
    link.fail("gone")
    with pytest.raises(EngineDeadError):
        await task
