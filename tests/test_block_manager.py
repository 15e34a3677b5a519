"""Block manager: no block ever leaks, prefix caching reuses exactly the right blocks, LRU eviction."""

from __future__ import annotations

import random

import pytest

from engine_service.core.block_manager import BlockManager
from engine_service.core.sequence import Sequence
from engine_service.sampling_params import SamplingParams


def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(), seed=0)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler does for a step that computed every known token of ``seq``."""
    assert bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_random_operations_never_leak_blocks() -> None:
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    live: list[Sequence] = []
    for step in range(2000):
        op = rng.random()
        if op < 0.4 or not live:
            # prompts drawn from a few shared prefixes so the cache gets hits
            prefix = [rng.randrange(3)] * rng.choice([0, 4, 8])
            seq = make_seq(prefix + [rng.randrange(50) for _ in range(rng.randrange(1, 12))], f"s{step}")
            bm.match_prefix(seq)
            if bm.allocate(seq, seq.num_tokens):
                seq.num_computed_tokens = seq.num_tokens
                bm.cache_full_blocks(seq)
                live.append(seq)
            else:
                bm.free(seq)
        elif op < 0.7:
            seq = rng.choice(live)
            seq.output_token_ids.append(rng.randrange(50))
            if bm.allocate(seq, seq.num_tokens):
                seq.num_computed_tokens = seq.num_tokens
                bm.cache_full_blocks(seq)
        else:
            bm.free(live.pop(rng.randrange(len(live))))
        held = {b for s in live for b in bm.block_table(s)}
        assert bm.num_free_blocks + len(held) == bm.num_blocks
        bm.check_invariants()
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_hit_reuses_blocks_and_leaves_one_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(10)), "a")
    compute_all(bm, a)  # blocks [0..3], [4..7] are full and cached
    b = make_seq([*list(range(8)), 99, 98], "b")
    assert bm.match_prefix(b) == 8
    assert bm.block_table(b) == bm.block_table(a)[:2]
    c = make_seq(list(range(8)), "c")  # fully cached prompt: the last block is recomputed
    assert bm.match_prefix(c) == 4
    d = make_seq([1, *list(range(1, 8))], "d")  # first block differs -> nothing after it is reused
    assert bm.match_prefix(d) == 0


def test_cached_blocks_survive_free_and_are_evicted_least_recent_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    compute_all(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    again = make_seq([1, 2, 3, 4, 9], "again")
    assert bm.match_prefix(again) == 4  # still cached after the free
    bm.free(again)
    # Fill the pool with unrelated blocks: the cached ones are evicted, and then miss.
    filler = make_seq(list(range(100, 108)), "filler")
    assert bm.allocate(filler, 8)
    bm.free(filler)
    assert bm.match_prefix(make_seq([1, 2, 3, 4, 9], "late")) == 0


def test_hash_collisions_are_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    monkeypatch.setattr(bm, "_chain_hash", lambda prev, ids: 42)  # every block collides
    a = make_seq([1, 2, 3, 4, 5], "a")
    compute_all(bm, a)
    b = make_seq([7, 8, 9], "b")
    assert bm.match_prefix(b) == 0  # same hash, different tokens: not reused


def test_allocation_failure_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    seq = make_seq([1, 2, 3, 4, 5, 6], "big")
    assert not bm.allocate(seq, 6)
    assert bm.block_table(seq) == () and bm.num_free_blocks == 2


def test_hit_rate_counts_a_resumed_sequences_outputs_on_both_sides() -> None:
    """A preempted sequence resumes with its generated tokens; hits on those must count as looked up too,
    or the hit rate exceeds 1."""
    bm = BlockManager(num_blocks=16, block_size=4)
    seq = make_seq([1, 2, 3, 4, 5])
    bm.match_prefix(seq)
    seq.output_token_ids.extend(range(10, 22))  # 5 prompt + 12 generated tokens, all computed
    compute_all(bm, seq)
    bm.free(seq)  # preempted: its blocks stay cached
    assert bm.match_prefix(seq) == 16  # resumed: 4 full blocks hit
    assert bm.prefix_cache_hits == 16
    assert bm.prefix_cache_queries == 5 + 17  # first admission, then the resumed sequence
    assert bm.prefix_cache_hits <= bm.prefix_cache_queries


def test_forked_prompt_blocks_are_shared_and_outlive_any_one_sample() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    leader = make_seq(prompt)
    compute_all(bm, leader)
    samples = [make_seq(prompt, f"s{i}") for i in range(3)]
    for seq in samples:
        seq.num_computed_tokens = bm.fork(seq, leader, len(prompt) - 1)
        assert seq.num_computed_tokens == 8 and bm.block_table(seq) == bm.block_table(leader)[:2]
        assert bm.allocate(seq, len(prompt))  # its own block for the prompt's last tokens
    assert bm.num_free_blocks == 16 - 3 - 3  # the 2 shared blocks once, 1 own block per sample
    bm.check_invariants()
    bm.free(leader)  # the leader ends first: the samples keep the prompt
    bm.check_invariants()
    assert bm.num_free_blocks == 16 - 2 - 3
    for seq in samples:
        bm.free(seq)
        bm.check_invariants()
    assert bm.num_free_blocks == 16
    assert bm.fork(make_seq(prompt, "late"), leader, 9) == 0  # a freed leader has nothing to share
