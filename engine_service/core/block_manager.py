"""Fixed-size KV blocks: reference counts, a free pool, block tables, and prefix caching.

The block manager is the only writer of KV-block state: every block's reference count and cache
key, the free pool, and each sequence's block table and block hashes (kept here, keyed by the
sequence; ``block_table(seq)`` hands out an immutable snapshot). It never writes a sequence: it reads
its tokens and its ``num_computed_tokens`` (the scheduler's) and answers with counts.

Prefix caching: once a block is full, it is keyed by a chained hash of (previous block's hash, its
token ids), so a block is only ever matched together with its whole prefix. A sequence's
``cache_salt`` takes the place of the (absent) previous hash of its first block, so every hash of a
salted prompt differs from the unsalted one's. A lookup compares the stored token ids and salt too,
so a hash collision can never serve wrong K/V, nor one tenant's block to another. Blocks whose last
user is gone stay in the cache, in the free pool in least-recently-freed order, until a fresh
allocation evicts them (or ``flush_cache`` drops them).

KV events (what SMG's cache-aware routing reads): while ``record_events(True)``, every block entering
the cache is recorded as ``BlockStored``, every cached hash evicted or flushed as ``BlockRemoved``,
a flush as ``AllBlocksCleared`` followed by the blocks still cached; ``take_events`` hands them over
(the engine loop does, once per step). Off (the default), recording costs one attribute test.

Invariants (``check_invariants``; tested property-based in tests/test_core_invariants.py):

- every block's reference count equals the number of block tables that hold it; a block is in the
  free pool exactly when its count is 0, so ``num_free_blocks + distinct blocks in tables == num_blocks``
  and nothing leaks or is freed twice;
- once every sequence is freed, ``num_free_blocks == num_blocks``;
- the cache maps a hash to a block that carries that hash; a block's table position is hashed only
  when the block is full of known, computed tokens.

Parallel samples (n > 1) share their prompt's blocks by reference count: ``fork`` gives a sample with no
blocks the leading full blocks of its sibling's table (each block's count goes up by one, the hashes
come along). Only full blocks of prompt tokens are shared, and never the block holding the prompt's
last token, so no shared block is ever written again: every sample writes its own tail (the last,
partial prompt block and its outputs) into blocks of its own. Freeing one sample only lowers the
counts, so the others keep the prompt, and the invariants above hold unchanged (a shared block is in
several tables and its count says how many).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from engine_service.core.sequence import Sequence
from engine_service.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KvCacheEvent


@dataclass
class _Block:
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    parent: int | None = None  # the previous block's hash (None: the first block); for KV events
    salt: str = ""  # the cache_salt of the sequence that filled it


@dataclass
class _SeqBlocks:
    """One sequence's blocks: its table (an immutable tuple, so snapshots are free) and the chained
    hashes of its leading full blocks."""

    table: tuple[int, ...] = ()
    hashes: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        # ref_count == 0 blocks, least recently freed first (evicted first); values unused
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._seqs: dict[Sequence, _SeqBlocks] = {}  # sequences holding blocks (or hashes) now
        self.prefix_cache_queries = 0  # tokens looked up (for hit-rate metrics; hits <= queries)
        self.prefix_cache_hits = 0
        self._events: list[KvCacheEvent] | None = None  # None: nobody subscribes, nothing recorded

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_table(self, seq: Sequence) -> tuple[int, ...]:
        """``seq``'s KV block ids, in token order (empty if it holds none): an immutable snapshot."""
        held = self._seqs.get(seq)
        return held.table if held is not None else ()

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs for its K/V to cover ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(self.block_table(seq)))

    # ---- prefix cache -----------------------------------------------------------------------
    def _chain_hash(self, prev: int | str | None, token_ids: tuple[int, ...]) -> int:
        """A signed 64-bit hash (SMG's ``KvBlock.block_hash`` is an int64); ``prev`` is the previous block's
        hash, or for the first block the sequence's cache salt (None when it has none)."""
        return hash((prev, token_ids))

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks of its longest cached prefix; returns the
        number of tokens they hold (the caller's new ``num_computed_tokens``).

        At least one token is always left to compute, so the step that finishes the prefill still
        produces logits.
        """
        assert seq not in self._seqs, "match_prefix is for sequences without blocks"
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = min(seq.num_tokens - 1, seq.num_known_tokens) // bs
        salt = seq.cache_salt
        prev: int | str | None = salt or None
        hits: list[int] = []
        hashes: list[int] = []
        for i in range(max_blocks):
            ids = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            h = self._chain_hash(prev, ids)
            block_id = self._cached.get(h)
            if block_id is None or self._blocks[block_id].token_ids != ids or self._blocks[block_id].salt != salt:
                break  # a miss (or a collision): nothing after it can be reused
            hits.append(block_id)
            hashes.append(h)
            prev = h
        # All its tokens: a preempted sequence resumes with its outputs, whose blocks may hit too.
        self.prefix_cache_queries += seq.num_tokens
        if hits:
            for block_id in hits:
                self._take(block_id)
            self._seqs[seq] = _SeqBlocks(tuple(hits), hashes)
        self.prefix_cache_hits += len(hits) * bs
        return len(hits) * bs

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s newly filled blocks (all K/V computed, all ids known) in the prefix cache."""
        held = self._seqs.get(seq)
        if held is None or len(held.hashes) >= seq.num_computed_tokens // self.block_size:
            return  # no block filled since the last call (most decode steps)
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        hashes = held.hashes
        full = min(seq.num_computed_tokens, seq.num_known_tokens, len(held.table) * bs) // bs
        while len(hashes) < full:
            i = len(hashes)
            ids = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            parent = hashes[i - 1] if i else None
            h = self._chain_hash(parent if i else (seq.cache_salt or None), ids)
            hashes.append(h)
            block_id = held.table[i]
            block = self._blocks[block_id]
            if h not in self._cached:  # an identical block cached earlier wins; this one stays private
                block.hash, block.token_ids, block.parent, block.salt = h, ids, parent, seq.cache_salt
                self._cached[h] = block_id
                if self._events is not None:
                    self._events.append(BlockStored(h, parent, ids, bs, seq.cache_salt))

    def fork(self, seq: Sequence, source: Sequence, num_tokens: int) -> int:
        """Share ``source``'s first ``num_tokens // block_size`` blocks (full, computed, never written again:
        the caller's promise) with ``seq``, which holds none. Returns the tokens they hold (``seq``'s new
        ``num_computed_tokens``); fewer if ``source`` holds fewer blocks (it was preempted meanwhile)."""
        assert seq not in self._seqs, "fork is for sequences without blocks"
        held = self._seqs.get(source)
        if held is None:
            return 0
        shared = held.table[: num_tokens // self.block_size]
        if not shared:
            return 0
        for block_id in shared:
            self._take(block_id)
        self._seqs[seq] = _SeqBlocks(shared, held.hashes[: len(shared)])
        return len(shared) * self.block_size

    # ---- allocation -------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens; False (and no change) if the pool is short."""
        held = self._seqs.get(seq)
        needed = -(-num_tokens // self.block_size) - (len(held.table) if held is not None else 0)
        if needed <= 0:
            return True
        if needed > len(self._free):
            return False
        new = []
        for _ in range(needed):
            block_id, _ = self._free.popitem(last=False)  # evict the least recently freed
            block = self._blocks[block_id]
            if block.hash is not None:
                self._uncache(block_id)
            block.ref_count = 1
            new.append(block_id)
        if held is None:
            held = self._seqs[seq] = _SeqBlocks()
        held.table += tuple(new)
        return True

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks (and forget its hashes). Its tail goes to the pool first, so shared
        prefixes outlive tails. A sequence without blocks is left as it is."""
        held = self._seqs.pop(seq, None)
        if held is None:
            return
        for block_id in reversed(held.table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:
                    self._free.move_to_end(block_id, last=False)  # uncached: reuse first

    def _uncache(self, block_id: int) -> None:
        """Forget ``block_id``'s hash (evicted for reuse, or flushed)."""
        block = self._blocks[block_id]
        h = block.hash
        if h is not None and self._cached.get(h) == block_id:
            del self._cached[h]
            if self._events is not None:
                self._events.append(BlockRemoved(h))
        block.hash, block.token_ids, block.parent, block.salt = None, (), None, ""

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    # ---- flush and KV events -----------------------------------------------------------------
    def flush_cache(self) -> tuple[int, int]:
        """Drop every cached block no live sequence holds; blocks in use stay cached (their sequences
        still run on them). Records ``AllBlocksCleared`` and then the blocks still cached, so a
        subscriber's view stays exact. Returns (blocks dropped, cached blocks kept)."""
        dropped = [b for b in self._cached.values() if self._blocks[b].ref_count == 0]
        events, self._events = self._events, None  # the snapshot below says it all
        for block_id in dropped:
            self._uncache(block_id)
            self._free.move_to_end(block_id, last=False)  # uncached: reused first
        self._events = events
        if events is not None:
            events += self.snapshot_events()
        return len(dropped), len(self._cached)

    def record_events(self, on: bool) -> None:
        """Start (True) or stop recording KV events; stopping drops what was not taken."""
        if not on:
            self._events = None
        elif self._events is None:
            self._events = []

    def take_events(self) -> list[KvCacheEvent]:
        """The events recorded since the last call, oldest first (empty when not recording)."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def snapshot_events(self) -> list[KvCacheEvent]:
        """The cache's state as events: ``AllBlocksCleared``, then a ``BlockStored`` for every block that
        a lookup can reach (its whole chain of parents is cached), parents before children. What a
        subscriber that joins late, or fell behind, starts from. O(cached blocks)."""
        out: list[KvCacheEvent] = [AllBlocksCleared()]
        reachable: set[int] = set()
        for h, block_id in self._cached.items():
            chain: list[_Block] = []
            block = self._blocks[block_id]
            while h not in reachable:
                chain.append(block)
                if block.parent is None:
                    break
                parent_id = self._cached.get(block.parent)
                if parent_id is None:
                    chain = []  # a parent was evicted: no lookup reaches this block any more
                    break
                h, block = block.parent, self._blocks[parent_id]
            for b in reversed(chain):
                assert b.hash is not None  # cached blocks are hashed
                reachable.add(b.hash)
                out.append(BlockStored(b.hash, b.parent, b.token_ids, self.block_size, b.salt))
        return out

    # ---- checks -----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the invariants of the module docstring do not hold (O(blocks): tests)."""
        refs = Counter(b for held in self._seqs.values() for b in held.table)
        for block_id, block in enumerate(self._blocks):
            assert block.ref_count == refs[block_id], (
                f"block {block_id}: ref_count {block.ref_count}, held by {refs[block_id]} tables"
            )
            assert (block.ref_count == 0) == (block_id in self._free), (
                f"block {block_id}: ref_count {block.ref_count} but {'' if block_id in self._free else 'not '}free"
            )
        assert self.num_free_blocks + len(refs) == self.num_blocks
        for h, block_id in self._cached.items():
            assert self._blocks[block_id].hash == h, f"cache entry {h} names block {block_id}, which has another hash"
        for seq, held in self._seqs.items():
            assert len(set(held.table)) == len(held.table), f"{seq.request_id}: a block twice in its table"
            assert len(held.hashes) * self.block_size <= min(seq.num_computed_tokens, seq.num_known_tokens), (
                f"{seq.request_id}: a block hashed before its tokens were computed and known"
            )
        assert self.prefix_cache_hits <= self.prefix_cache_queries
