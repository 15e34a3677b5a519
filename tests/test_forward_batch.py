"""ForwardBatch.build: the plain-Python path for small decode batches equals the general NumPy path,
field by field, and both reject a block table too short for the sequence."""

from __future__ import annotations

import random

import pytest
import torch

import qwen3.forward_batch as forward_batch
from qwen3.forward_batch import ForwardBatch


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
