"""(row, token id) pairs of a sampling batch: the earlier tokens that penalties and bans read, flattened on the
host and copied to the device once per step (no per-row work on the device)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qwen3.forward_batch import copy_to_device


@dataclass
class TokenPairs:
    """Sparse (row, token id) pairs, e.g. every token a row has seen; duplicates allowed."""

    rows: torch.Tensor  # [P] int64
    tokens: torch.Tensor  # [P] int64


def history_pairs(
    wanted: list[bool],
    prompt_token_ids: list[list[int]] | None,
    output_token_ids: list[list[int]],
    pending: list[bool] | None,
    pending_token_ids: torch.Tensor | None,
    device: torch.device | str,
) -> TokenPairs | None:
    """(row, token) pairs of the earlier tokens of the ``wanted`` rows: their prompt (when given) and
    output tokens. A last output token still on the device (``pending``) is read from
    ``pending_token_ids`` on the device."""
    known, pending_rows = [], []
    for row, (want, output) in enumerate(zip(wanted, output_token_ids)):
        if not want:
            known.append(())
            continue
        if pending is not None and pending[row]:
            pending_rows.append(row)
        known.append(output if prompt_token_ids is None else prompt_token_ids[row] + output)
    pairs = token_pairs(known, device)
    if not pending_rows:
        return pairs
    if pending_token_ids is None:
        raise ValueError("pending: a row with a pending output token needs pending_token_ids")
    rows = copy_to_device(torch.tensor(pending_rows, dtype=torch.int64), device)  # [R]
    tokens = pending_token_ids[rows]  # [R], gathered on the device
    if pairs is None:
        return TokenPairs(rows, tokens)
    return TokenPairs(torch.cat([pairs.rows, rows]), torch.cat([pairs.tokens, tokens]))


def token_pairs(tokens_per_row: list, device: torch.device | str) -> TokenPairs | None:
    """Flatten per-row token lists into (row, token) pairs on ``device``; None when all are empty."""
    lengths = np.fromiter((len(t) for t in tokens_per_row), dtype=np.int64, count=len(tokens_per_row))
    total = int(lengths.sum())
    if total == 0:
        return None
    tokens = np.fromiter((t for row in tokens_per_row for t in row), dtype=np.int64, count=total)
    rows = np.repeat(np.arange(len(tokens_per_row), dtype=np.int64), lengths)
    return TokenPairs(copy_to_device(torch.from_numpy(rows), device), copy_to_device(torch.from_numpy(tokens), device))
