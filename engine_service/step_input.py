"""What one engine step asks of the model, in host-side lists: built by the engine from the
scheduler's decision, sent as-is to tensor-parallel workers (it pickles small), turned into a
``ForwardBatch`` by each rank's model runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StepInput:
    token_ids: list[list[int]]      # per sequence, the tokens whose K/V this step computes
    context_lens: list[int]         # per sequence, tokens already in the KV cache
    block_tables: list[list[int]]   # per sequence, its KV block ids (cover context + new tokens)
    sample_rows: list[bool]         # per sequence, whether its last new token's logits are sampled

    @property
    def num_seqs(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class PendingTokens:
    """Input tokens the host does not know yet: sampled by the previous step, still on the device.

    With one step in flight (``async_scheduling``), a decode row's input token is the one its sequence
    sampled in the step before, which has not reached the host when this step is built. The host list
    holds a stand-in; the model runner copies the real ids over it on the device, in stream order.
    """

    flat_positions: list[int]   # indices into the step's flat token list (sequence after sequence)
    source_rows: list[int]      # the matching rows of ``sampled``
    sampled: torch.Tensor       # [S_prev] int64 on the device: the previous step's sampled ids
