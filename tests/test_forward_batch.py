"""ForwardBatch.build: the plain-Python path for small decode batches equals the general NumPy path,
field by field, and both reject a block table too short for the sequence; the block-table rows a model runner
keeps between steps give the same batch as a fresh array."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen3.forward_batch as forward_batch
from qwen3.forward_batch import BlockTableRows, ForwardBatch


def _random_decode(num_seqs: int, block_size: int, seed: int) -> tuple:
    rng = random.Random(seed)
    context = [rng.randrange(0, 300) for _ in range(num_seqs)]
    tables = [rng.sample(range(500), -(-(c + 1) // block_size) + rng.randrange(3)) for c in context]
    logits_for = [rng.random() < 0.7 for _ in range(num_seqs)]
    return [[rng.randrange(1000)] for _ in range(num_seqs)], context, tables, block_size, "cpu", logits_for


@pytest.mark.parametrize("num_seqs, block_size, seed", [(1, 16, 0), (3, 16, 1), (8, 256, 2), (16, 16, 3)])
def test_small_decode_path_equals_general_path(
    num_seqs: int, block_size: int, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _random_decode(num_seqs, block_size, seed)
    small = ForwardBatch.build(*args)
    monkeypatch.setattr(forward_batch, "_SMALL_DECODE", 0)  # force the NumPy path
    general = ForwardBatch.build(*args)
    for name in (
        "input_ids",
        "positions",
        "slot_mapping",
        "query_start_loc",
        "seq_lens",
        "block_tables",
        "logits_indices",
    ):
        a, b = getattr(small, name), getattr(general, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for name in ("max_query_len", "max_seq_len", "query_lens_cpu", "seq_lens_cpu"):
        assert getattr(small, name) == getattr(general, name), name


@pytest.mark.parametrize("small", [True, False])
def test_short_block_table_is_rejected(small: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not small:
        monkeypatch.setattr(forward_batch, "_SMALL_DECODE", 0)
    with pytest.raises(ValueError, match="sequence 0 needs 17 KV slots but its block table holds 16"):
        ForwardBatch.build([[1]], [16], [[4]], 16)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_kept_block_table_rows_equal_a_fresh_padded_array(data: st.DataObject) -> None:
    """A model runner's BlockTableRows, fed step after step (rows joining and leaving, tables growing, a row taken
    by another sequence with a shorter table, the same tuple objects kept), returns what a fresh zero-padded array
    of the step's tables holds; ForwardBatch.build with it equals ForwardBatch.build without it."""
    kept = BlockTableRows()
    tables: list[tuple[int, ...]] = []
    block_ids = st.integers(min_value=1, max_value=10_000)
    for _ in range(data.draw(st.integers(min_value=1, max_value=12))):
        num_seqs = data.draw(st.integers(min_value=1, max_value=40))
        step: list[tuple[int, ...]] = []
        for i in range(num_seqs):
            action = data.draw(st.sampled_from(["keep", "grow", "new"])) if i < len(tables) else "new"
            if action == "keep":
                step.append(tables[i])
            elif action == "grow":
                step.append(tables[i] + tuple(data.draw(st.lists(block_ids, min_size=1, max_size=3))))
            else:
                step.append(tuple(data.draw(st.lists(block_ids, min_size=1, max_size=70))))
        tables = step
        width = max(len(t) for t in tables)
        expect = np.zeros((num_seqs, width), dtype=np.int64)
        for i, table in enumerate(tables):
            expect[i, : len(table)] = table
        assert np.array_equal(kept.fill(tables, width), expect)
        lens = [len(t) * 4 - 1 for t in tables]  # block size 4: each table just covers its sequence
        args = ([[7]] * num_seqs, lens, tables, 4, "cpu", None)
        fresh, reused = ForwardBatch.build(*args), ForwardBatch.build(*args, table_rows=kept)
        assert torch.equal(fresh.block_tables, reused.block_tables)
        assert torch.equal(fresh.slot_mapping, reused.slot_mapping)
