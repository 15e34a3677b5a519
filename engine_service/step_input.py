"""What one engine step asks of the model, in host-side lists: built by the engine from the
scheduler's decision, sent as-is to tensor-parallel workers (it pickles small), turned into a
``ForwardBatch`` by each rank's model runner."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepInput:
    token_ids: list[list[int]]      # per sequence, the tokens whose K/V this step computes
    context_lens: list[int]         # per sequence, tokens already in the KV cache
    block_tables: list[list[int]]   # per sequence, its KV block ids (cover context + new tokens)
    sample_rows: list[bool]         # per sequence, whether its last new token's logits are sampled

    @property
    def num_seqs(self) -> int:
        return len(self.token_ids)
