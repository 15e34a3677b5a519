"""What one engine step asks of the model, in host-side columns: projected from the scheduler's
``StepPlan`` (``StepPlan.model_input``), sent as-is to tensor-parallel workers (it pickles small),
turned into a ``ForwardBatch`` by each rank's model runner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: the input slot of a pending token before the device copy fills it (see ``StepInput.input_token_ids``)
_EMPTY_SLOT = (0,)


@dataclass(frozen=True)
class PendingTokens:
    """Input tokens the host does not know yet: sampled by the previous step, still on the device.

    With one step in flight (``async_scheduling``), a decode row's input token is the one its sequence
    sampled in the step before, which has not reached the host when this step is built. Each rank's
    model runner copies it into the batch's input ids from that step's sampled ids
    (``ModelRunner.last_sampled``), on the device and in stream order.
    """

    rows: tuple[int, ...]  # rows of this step whose last new token is pending
    flat_positions: tuple[int, ...]  # their indices into the step's flat token list (sequence after sequence)
    source_rows: tuple[int, ...]  # the matching rows of the previous step's sampled ids


@dataclass(frozen=True)
class PromptLogprobsInput:
    """Prompt positions whose full-vocabulary log-softmax this step computes (``SamplingParams.prompt_logprobs``).

    Every rank runs the LM head over these positions (it is vocabulary-parallel: its all-gather pairs up
    across ranks); rank 0 turns them into logprobs. Position ``flat_positions[i]`` predicts ``target_ids[i]``,
    the prompt token after it.
    """

    flat_positions: tuple[int, ...]  # indices into the step's flat token list
    target_ids: tuple[int, ...]  # the prompt token each position predicts (its logprob is reported)
    num_top: int  # alternatives per position (the most any row asked for; 0: the target's only)


@dataclass(frozen=True)
class StepInput:
    """Per row (one sequence each): the ids this step computes, its context, its KV blocks, whether
    it samples. A row named in ``pending`` has one new token more than its ``token_ids``: the last,
    whose id only the device has."""

    token_ids: Sequence[Sequence[int]]  # per row, the known ids of its new tokens
    context_lens: Sequence[int]  # per row, tokens already in the KV cache
    block_tables: Sequence[Sequence[int]]  # per row, its KV block ids (cover context + new tokens)
    sample_rows: Sequence[bool]  # per row, whether its last new token's logits are sampled
    pending: PendingTokens | None = None
    # After the step, rank 0 broadcasts its sampled ids to every rank (async scheduling with TP > 1),
    # so that the next step's pending tokens can be filled on every rank.
    share_sampled: bool = field(default=False)
    # Prompt logprobs and Embed requests need hidden states beyond the sampled rows' logits; such a step
    # runs eagerly (never through a decode CUDA graph). Steps without them are unchanged.
    prompt_logprobs: PromptLogprobsInput | None = None
    embed_rows: tuple[int, ...] = ()  # rows of the sampled ones (``sample_rows``) whose hidden state is returned

    @property
    def needs_hidden(self) -> bool:
        """The step returns more than the sampled rows' logits (it cannot run through a CUDA graph)."""
        return self.prompt_logprobs is not None or bool(self.embed_rows)

    @property
    def num_seqs(self) -> int:
        return len(self.token_ids)

    @property
    def num_sampled(self) -> int:
        return sum(self.sample_rows)

    def input_token_ids(self) -> list[Sequence[int]]:
        """Per row, the contents the model's input-id buffer starts with: the known ids, and for a
        pending row one more slot, 0 until the runner's device copy overwrites it. (A new list: the
        step itself only ever holds known ids.)"""
        tokens = list(self.token_ids)
        if self.pending is not None:
            for row in self.pending.rows:
                tokens[row] = (*tokens[row], *_EMPTY_SLOT) if tokens[row] else _EMPTY_SLOT  # a decode row: no known id
        return tokens
