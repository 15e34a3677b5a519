"""What one engine step asks of the model, in host-side lists: built by the engine from the
scheduler's decision, sent as-is to tensor-parallel workers (it pickles small), turned into a
``ForwardBatch`` by each rank's model runner."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PendingTokens:
    """Input tokens the host does not know yet: sampled by the previous step, still on the device.

    With one step in flight (``async_scheduling``), a decode row's input token is the one its sequence
    sampled in the step before, which has not reached the host when this step is built. The host list
    holds a stand-in; each rank's model runner copies the real ids over it from that step's sampled ids
    (``ModelRunner.last_sampled``), on the device and in stream order.
    """

    flat_positions: list[int]   # indices into the step's flat token list (sequence after sequence)
    source_rows: list[int]      # the matching rows of the previous step's sampled ids


@dataclass(frozen=True)
class StepInput:
    token_ids: list[list[int]]      # per sequence, the tokens whose K/V this step computes
    context_lens: list[int]         # per sequence, tokens already in the KV cache
    block_tables: list[list[int]]   # per sequence, its KV block ids (cover context + new tokens)
    sample_rows: list[bool]         # per sequence, whether its last new token's logits are sampled
    pending: PendingTokens | None = None
    # After the step, rank 0 broadcasts its sampled ids to every rank (async scheduling with TP > 1),
    # so that the next step's pending tokens can be filled on every rank.
    share_sampled: bool = field(default=False)

    @property
    def num_seqs(self) -> int:
        return len(self.token_ids)

    @property
    def num_sampled(self) -> int:
        return sum(self.sample_rows)
