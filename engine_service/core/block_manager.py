"""Fixed-size KV blocks: reference counts, a free pool, and prefix caching.

Prefix caching: once a block is full, it is keyed by a chained hash of (previous block's hash, its
token ids), so a block is only ever matched together with its whole prefix. A lookup compares the
stored token ids too, so a hash collision can never serve wrong K/V. Blocks whose last user is gone
stay in the cache, in the free pool in least-recently-freed order, until a fresh allocation evicts
them.

Invariant (tested): ``num_free_blocks + blocks held by live sequences == num_blocks``; once every
sequence has finished or been aborted, ``num_free_blocks == num_blocks``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine_service.core.sequence import Sequence


@dataclass
class _Block:
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


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
        self.prefix_cache_queries = 0      # tokens looked up (for hit-rate metrics; hits <= queries)
        self.prefix_cache_hits = 0

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs for its K/V to cover ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # ---- prefix cache -----------------------------------------------------------------------
    def _chain_hash(self, prev: int | None, token_ids: tuple[int, ...]) -> int:
        return hash((prev, token_ids))

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks of its longest cached prefix.

        At least one token is always left to compute, so the step that finishes the prefill still
        produces logits. Returns the number of tokens served from the cache.
        """
        assert not seq.block_table, "match_prefix is for sequences without blocks"
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        prev: int | None = None
        hits: list[int] = []
        for i in range(max_blocks):
            ids = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            h = self._chain_hash(prev, ids)
            block_id = self._cached.get(h)
            if block_id is None or self._blocks[block_id].token_ids != ids:
                break  # a miss (or a collision): nothing after it can be reused
            hits.append(block_id)
            seq.block_hashes.append(h)
            prev = h
        # All its tokens: a preempted sequence resumes with its outputs, whose blocks may hit too.
        self.prefix_cache_queries += seq.num_tokens
        for block_id in hits:
            self._take(block_id)
        seq.block_table = hits
        seq.num_hashed_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * bs
        self.prefix_cache_hits += seq.num_computed_tokens
        return seq.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s newly filled blocks (all K/V computed) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        while seq.num_hashed_blocks < full:
            i = seq.num_hashed_blocks
            ids = tuple(seq.token_ids(i * bs, (i + 1) * bs))
            prev = seq.block_hashes[i - 1] if i else None
            h = self._chain_hash(prev, ids)
            seq.block_hashes.append(h)
            block_id = seq.block_table[i]
            block = self._blocks[block_id]
            if h not in self._cached:  # an identical block cached earlier wins; this one stays private
                block.hash, block.token_ids = h, ids
                self._cached[h] = block_id
            seq.num_hashed_blocks += 1

    # ---- allocation -------------------------------------------------------------------------
    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens; False (and no change) if the pool is short."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block_id, _ = self._free.popitem(last=False)  # evict the least recently freed
            block = self._blocks[block_id]
            if block.hash is not None:
                if self._cached.get(block.hash) == block_id:
                    del self._cached[block.hash]
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            seq.block_table.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks. Its tail goes to the pool first, so shared prefixes outlive tails."""
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self._free[block_id] = None
                    self._free.move_to_end(block_id, last=False)  # uncached: reuse first
                else:
                    self._free[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1
