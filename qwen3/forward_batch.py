"""The one description of a forward step, passed explicitly from the engine through every layer.

A step is a flat batch of ``T`` tokens from ``B`` sequences. Each sequence contributes its new
tokens (a whole prompt, a prefill chunk, or one decode token); its earlier tokens are already in the
paged KV cache. Attention backends read what they need from here; nothing is global.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

#: decode batches up to this size are assembled in plain Python (NumPy's per-call overhead dominates there)
_SMALL_DECODE = 16


class BlockTableRows:
    """The padded [B, W] block-table array of the last batch built with it, kept between steps by its one owner
    (a model runner): a decode step changes few rows (a sequence takes a new block every block_size tokens), so
    only rows whose table is not the same object as the previous step's row are rewritten. Tables are immutable
    tuples, so the same object means the same ids (a list compares unequal by identity each step: always
    rewritten, still correct)."""

    def __init__(self) -> None:
        self._rows: list[Sequence[int]] = []  # the tables the array rows hold, row by row
        self._array = np.zeros((0, 0), dtype=np.int64)  # [capacity rows, capacity width], zero past each table

    def fill(self, block_tables: Sequence[Sequence[int]], width: int) -> np.ndarray:
        """[B, width] int64: row i is ``block_tables[i]`` padded with 0 (a view into the kept array; valid until the
        next call)."""
        num_seqs = len(block_tables)
        array, rows = self._array, self._rows
        if array.shape[0] < num_seqs or array.shape[1] < width:
            # grow with headroom so that a growing batch or table does not rebuild every step
            shape = (max(num_seqs, 2 * array.shape[0]), -(-width // 16) * 16 + 16)
            array = self._array = np.zeros(shape, dtype=np.int64)
            rows = self._rows = []
        for i, table in enumerate(block_tables):
            if i < len(rows):
                if rows[i] is table:
                    continue
                array[i, len(table) : len(rows[i])] = 0  # a shorter table than the row held before
                rows[i] = table
            else:
                rows.append(table)
            array[i, : len(table)] = table
        return array[:num_seqs, :width]


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64 token ids of the new tokens, sequence after sequence
    positions: torch.Tensor  # [T] int64 absolute position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64 KV-cache slot (block * block_size + offset) of each token; -1 = skip
    query_start_loc: torch.Tensor  # [B + 1] int32 cumulative new-token counts (cu_seqlens_q)
    seq_lens: torch.Tensor  # [B] int32 context length of each sequence including its new tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32 KV block ids of each sequence, padded with 0
    logits_indices: torch.Tensor  # [S] int64 rows of the T tokens whose logits are wanted (usually each last token)
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends and bookkeeping that must not synchronise with the device.
    query_lens_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (the CUDA-graph-able case)."""
        return self.max_query_len == 1

    @classmethod
    def _build_small_decode(
        cls,
        new_token_ids: list[list[int]],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        logits_for: list[bool] | None,
    ) -> ForwardBatch:
        """``build`` for a few sequences adding one token each, in plain Python: at batch 1 NumPy's per-call
        overhead made the general path cost ~0.08 ms of host time per decode step, this one ~0.03 ms."""
        num_seqs = len(new_token_ids)
        seq_lens = [c + 1 for c in context_lens]
        width = max(len(t) for t in block_tables)
        slots = []
        for i, (pos, table) in enumerate(zip(context_lens, block_tables)):
            if len(table) * block_size < pos + 1:
                raise _table_too_short(i, pos + 1, len(table) * block_size)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        return cls._on_device(
            int64_parts=(
                [t[0] for t in new_token_ids],
                list(context_lens),
                slots,
                [i for i in range(num_seqs) if logits_for is None or logits_for[i]],
            ),
            int32_parts=(
                list(range(num_seqs + 1)),
                seq_lens,
                [x for table in block_tables for x in (*table, *([0] * (width - len(table))))],
            ),
            num_seqs=num_seqs,
            width=width,
            query_lens=[1] * num_seqs,
            seq_lens=seq_lens,
            device=device,
        )

    @classmethod
    def _on_device(
        cls,
        int64_parts: tuple[np.ndarray | list[int], ...],  # ids, positions, slots, logits rows
        int32_parts: tuple[np.ndarray | list[int], ...],  # query starts, sequence lengths, flat block tables
        num_seqs: int,
        width: int,
        query_lens: list[int],
        seq_lens: list[int],
        device: torch.device | str,
    ) -> ForwardBatch:
        """The batch from its host parts: (ids, positions, slots, logits rows) and (query starts, sequence
        lengths, flat block tables). Two host-to-device copies per step (one per index dtype), not one per
        array: each copy has a fixed cost of several microseconds of host time, paid on every decode step."""
        input_ids, positions, slot_mapping, logits_indices = _packed_to_device(int64_parts, torch.int64, device)
        query_start_loc, seq_lens_t, tables_flat = _packed_to_device(int32_parts, torch.int32, device)
        return cls(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens_t,
            block_tables=tables_flat.view(num_seqs, width),
            logits_indices=logits_indices,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )

    @classmethod
    def build(
        cls,
        new_token_ids: list[list[int]],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        logits_for: list[bool] | None = None,
        table_rows: BlockTableRows | None = None,
    ) -> ForwardBatch:
        """Assemble a batch on the host from per-sequence lists.

        ``new_token_ids[i]`` are the tokens sequence ``i`` adds; ``context_lens[i]`` how many of its tokens
        are already cached; ``block_tables[i]`` its KV blocks (enough for all its tokens). Logits are
        computed for the last new token of every sequence with ``logits_for[i]`` true (default: all).
        ``table_rows``: the caller's block-table array kept from its previous step (rows it already holds are
        not copied again).
        """
        num_seqs = len(new_token_ids)
        if not (num_seqs == len(context_lens) == len(block_tables)) or num_seqs == 0:
            raise ValueError("new_token_ids, context_lens and block_tables need one entry per sequence (at least one)")
        if num_seqs <= _SMALL_DECODE and all(len(t) == 1 for t in new_token_ids):
            return cls._build_small_decode(new_token_ids, context_lens, block_tables, block_size, device, logits_for)
        query_lens = np.fromiter((len(t) for t in new_token_ids), dtype=np.int64, count=num_seqs)
        if (query_lens == 0).any():
            raise ValueError(f"sequence {int(np.argmin(query_lens))} adds no tokens")
        cached = np.asarray(context_lens, dtype=np.int64)
        seq_lens = cached + query_lens
        width = max(len(t) for t in block_tables)
        tables = (table_rows or BlockTableRows()).fill(block_tables, width)  # [B, width]
        capacity = np.fromiter((len(t) for t in block_tables), dtype=np.int64, count=num_seqs) * block_size
        if (capacity < seq_lens).any():
            i = int(np.argmax(capacity < seq_lens))
            raise _table_too_short(i, int(seq_lens[i]), int(capacity[i]))
        # Per-token arrays without a per-token Python loop: token t belongs to sequence seq_of[t].
        starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=starts[1:])
        seq_of = np.repeat(np.arange(num_seqs), query_lens)
        positions = np.arange(int(starts[-1]), dtype=np.int64) - starts[seq_of] + cached[seq_of]
        slots = tables[seq_of, positions // block_size] * block_size + positions % block_size
        ids = np.fromiter(itertools.chain.from_iterable(new_token_ids), dtype=np.int64, count=int(starts[-1]))
        want = np.ones(num_seqs, dtype=bool) if logits_for is None else np.asarray(logits_for, dtype=bool)
        logits_rows = starts[1:][want] - 1

        return cls._on_device(
            int64_parts=(ids, positions, slots, logits_rows),
            int32_parts=(starts, seq_lens, tables.reshape(-1)),  # a copy when the kept array is wider
            num_seqs=num_seqs,
            width=width,
            query_lens=query_lens.tolist(),
            seq_lens=seq_lens.tolist(),
            device=device,
        )


def _table_too_short(seq: int, needed: int, capacity: int) -> ValueError:
    return ValueError(f"sequence {seq} needs {needed} KV slots but its block table holds {capacity}")


def _packed_to_device(
    parts: tuple[np.ndarray | list[int], ...], dtype: torch.dtype, device: torch.device | str
) -> list[torch.Tensor]:
    """``parts`` as tensors of ``dtype`` on ``device``, views into one buffer filled by one copy.

    On the CPU the buffer is the host array itself. Elsewhere it is copied from pinned memory without
    blocking the host (PyTorch caches pinned blocks and does not reuse one before its copy is done).
    Each part starts on a 64-byte boundary (dtype is int32 or int64): kernels may load these arrays with
    vector instructions.
    """
    align = 16 if dtype == torch.int32 else 8
    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + -(-len(part) // align) * align)
    if all(isinstance(part, list) for part in parts):  # small batches: one tensor from one flat list
        flat: list[int] = []
        for part, start in zip(parts, offsets[1:]):
            flat.extend(part)
            flat.extend([0] * (start - len(flat)))
        buffer = torch.tensor(flat, dtype=dtype)
    else:
        packed = np.zeros(offsets[-1], dtype=np.int64 if dtype == torch.int64 else np.int32)
        for part, start in zip(parts, offsets):
            packed[start : start + len(part)] = part
        buffer = torch.from_numpy(packed)
    buffer = copy_to_device(buffer, device)
    return [buffer[start : start + len(part)] for part, start in zip(parts, offsets)]


def copy_to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` on ``device`` without making the host wait for the device.

    A plain ``.to(device)`` from pageable memory synchronises with the stream, i.e. waits for every
    kernel queued before it: that would stall the host behind the step in flight. A copy from pinned
    memory is queued like a kernel (PyTorch caches pinned blocks and does not reuse one before its copy
    is done). On the CPU the tensor is returned as is.
    """
    if torch.device(device).type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
