"""Per-request token controls of one sampling step, batched: ``logit_bias``, ``allowed_token_ids``, ``bad_words``.

Each is gathered on the host into flat index tensors for the rows that use it (one pass over the rows'
parameters, never over the vocabulary) and applied to the step's scores [S, V] as one scatter or masked
operation for the whole batch. A batch in which no row uses a control builds ``None`` for it and spends
nothing on it on the device.

``bad_words`` follows vLLM: a word's last id is banned while the output ends with the ids before it. With
async scheduling the output's last id may still be on the device (a pending token); a word whose
host-side comparison passes is then banned only where that id, gathered on the device, equals the word's
second-to-last id (:class:`PendingBans`), so the host never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_service.sampling_params import SamplingParams
from qwen3.forward_batch import copy_to_device


def _device_ints(values: list[int], device: torch.device | str) -> torch.Tensor:
    return copy_to_device(torch.tensor(values, dtype=torch.int64), device)


@dataclass
class LogitBias:
    """Biases added to (row, token) scores; a row names each token at most once (a mapping)."""

    rows: torch.Tensor  # [P] int64
    tokens: torch.Tensor  # [P] int64
    values: torch.Tensor  # [P] float32

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device | str) -> LogitBias | None:
        rows, tokens, values = [], [], []
        for row, p in enumerate(params):
            for token, bias in p.logit_bias:
                rows.append(row)
                tokens.append(token)
                values.append(bias)
        if not rows:
            return None
        return cls(
            _device_ints(rows, device),
            _device_ints(tokens, device),
            copy_to_device(torch.tensor(values, dtype=torch.float32), device),
        )

    def apply(self, scores: torch.Tensor) -> None:
        """scores[row, token] += bias, in place (one scatter)."""
        scores.index_put_((self.rows, self.tokens), self.values.to(scores.dtype), accumulate=True)


@dataclass
class AllowedTokens:
    """Rows restricted to a set of tokens: every other token of those rows is banned."""

    rows: torch.Tensor  # [R] int64, the restricted rows
    pair_rows: torch.Tensor  # [A] int64 in [0, R): index into ``rows``
    pair_tokens: torch.Tensor  # [A] int64, the allowed ids

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device | str) -> AllowedTokens | None:
        rows, pair_rows, pair_tokens = [], [], []
        for row, p in enumerate(params):
            if p.allowed_token_ids is not None:
                pair_rows.extend([len(rows)] * len(p.allowed_token_ids))
                pair_tokens.extend(p.allowed_token_ids)
                rows.append(row)
        if not rows:
            return None
        return cls(_device_ints(rows, device), _device_ints(pair_rows, device), _device_ints(pair_tokens, device))

    def apply(self, scores: torch.Tensor) -> None:
        """Ban every token but the allowed ones of the restricted rows, in place."""
        banned = torch.ones(self.rows.shape[0], scores.shape[1], dtype=torch.bool, device=scores.device)  # [R, V]
        banned[self.pair_rows, self.pair_tokens] = False
        scores.index_copy_(0, self.rows, scores.index_select(0, self.rows).masked_fill_(banned, float("-inf")))


@dataclass
class PendingBans:
    """Bans that hold only if a row's last output id, still on the device, equals ``required``."""

    rows: torch.Tensor  # [B] int64
    tokens: torch.Tensor  # [B] int64, the banned ids
    required: torch.Tensor  # [B] int64, what the row's pending id must be
    pending: torch.Tensor  # [B] int64, the row's pending id (gathered on the device)

    def apply(self, scores: torch.Tensor) -> None:
        """scores[row, token] = -inf where pending == required, in place. Adding -inf or 0 (one scatter with
        accumulate) keeps the result independent of the order of duplicate (row, token) pairs."""
        ban = torch.where(self.pending == self.required, float("-inf"), 0.0).to(scores.dtype)  # [B]
        scores.index_put_((self.rows, self.tokens), ban, accumulate=True)


def bad_word_bans(
    params: list[SamplingParams], output_token_ids: list[list[int]], pending: list[bool] | None = None
) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """The bad_words bans of one step: per row the ids banned outright, and (row, id, required) bans that
    also need the row's pending last id to equal ``required``. ``output_token_ids[i]`` are the ids known on
    the host; ``pending[i]``: row i has one more, still on the device. Host work is bounded by the words'
    total length (the request limits), not by the output's."""
    definite: list[list[int]] = [[] for _ in params]
    conditional: list[tuple[int, int, int]] = []
    for row, (p, known) in enumerate(zip(params, output_token_ids)):
        has_pending = pending is not None and pending[row]
        for word in p.bad_words:
            prefix = tuple(word[:-1])
            if len(prefix) > len(known) + has_pending:
                continue
            if not prefix:
                definite[row].append(word[-1])
            elif not has_pending:
                if tuple(known[len(known) - len(prefix) :]) == prefix:
                    definite[row].append(word[-1])
            elif tuple(known[len(known) - (len(prefix) - 1) :]) == prefix[:-1]:
                conditional.append((row, word[-1], prefix[-1]))
    return definite, conditional


def pending_bans(
    conditional: list[tuple[int, int, int]], pending_token_ids: torch.Tensor | None, device: torch.device | str
) -> PendingBans | None:
    """:class:`PendingBans` of ``bad_word_bans``' conditional bans; ``pending_token_ids`` [S] holds the
    pending ids (``SamplingBatch.build``)."""
    if not conditional:
        return None
    if pending_token_ids is None:
        raise ValueError("output_token_ids: a pending last token needs pending_token_ids")
    rows, tokens, required = (_device_ints(list(column), device) for column in zip(*conditional))
    return PendingBans(rows, tokens, required, pending_token_ids[rows])
