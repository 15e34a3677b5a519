"""The one description of a forward step, passed explicitly from the engine through every layer.

A step is a flat batch of ``T`` tokens from ``B`` sequences. Each sequence contributes its new
tokens (a whole prompt, a prefill chunk, or one decode token); its earlier tokens are already in the
paged KV cache. Attention backends read what they need from here; nothing is global.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor        # [T] int64 token ids of the new tokens, sequence after sequence
    positions: torch.Tensor        # [T] int64 absolute position of each new token in its sequence
    slot_mapping: torch.Tensor     # [T] int64 KV-cache slot (block * block_size + offset) of each token; -1 = skip
    query_start_loc: torch.Tensor  # [B + 1] int32 cumulative new-token counts (cu_seqlens_q)
    seq_lens: torch.Tensor         # [B] int32 context length of each sequence including its new tokens
    block_tables: torch.Tensor     # [B, max_blocks] int32 KV block ids of each sequence, padded with 0
    logits_indices: torch.Tensor   # [S] int64 rows of the T tokens whose logits are wanted (usually each last token)
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
    def build(
        cls,
        new_token_ids: list[list[int]],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        logits_for: list[bool] | None = None,
    ) -> "ForwardBatch":
        """Assemble a batch on the host from per-sequence lists.

        ``new_token_ids[i]`` are the tokens sequence ``i`` adds; ``context_lens[i]`` how many of its tokens
        are already cached; ``block_tables[i]`` its KV blocks (enough for all its tokens). Logits are
        computed for the last new token of every sequence with ``logits_for[i]`` true (default: all).
        """
        if not (len(new_token_ids) == len(context_lens) == len(block_tables)):
            raise ValueError("new_token_ids, context_lens and block_tables must have one entry per sequence")
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        for i, (tokens, cached, table) in enumerate(zip(new_token_ids, context_lens, block_tables)):
            if not tokens:
                raise ValueError(f"sequence {i} adds no tokens")
            total = cached + len(tokens)
            if len(table) * block_size < total:
                raise ValueError(f"sequence {i} needs {total} KV slots but its block table holds {len(table) * block_size}")
            ids.extend(tokens)
            for pos in range(cached, total):
                positions.append(pos)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(total)
            if logits_for is None or logits_for[i]:
                logits_rows.append(starts[-1] - 1)
        width = max(len(t) for t in block_tables)
        tables = [t + [0] * (width - len(t)) for t in block_tables]
        query_lens = [len(t) for t in new_token_ids]

        def as_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(
            input_ids=as_tensor(ids, torch.int64),
            positions=as_tensor(positions, torch.int64),
            slot_mapping=as_tensor(slots, torch.int64),
            query_start_loc=as_tensor(starts, torch.int32),
            seq_lens=as_tensor(seq_lens, torch.int32),
            block_tables=as_tensor(tables, torch.int32),
            logits_indices=as_tensor(logits_rows, torch.int64),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
