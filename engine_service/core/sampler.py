"""Turn a batch of logits into next tokens: penalties, warpers and seeded sampling, all rows at once.

Per step the engine builds a ``SamplingBatch`` (per-row parameter tensors, built once from Python
lists) and calls ``Sampler()(logits, batch)``. Everything after that runs as whole-batch tensor ops on
the logits' device; work that no row asks for (a sort for top-p, penalties, logprobs) is skipped.

Processing order: logit_bias, then as transformers' ``generate``: repetition penalty (prompt + output
tokens), presence/frequency penalties (output tokens); then the bans (allowed_token_ids, bad_words,
min_tokens' EOS and stop ids; :mod:`engine_service.core.logit_masks`) and the structured-output bitmask
(:mod:`engine_service.core.structured_output`); then greedy rows take the argmax
and sampled rows apply temperature, top-k, top-p, min-p and draw.

Randomness is counter-based, drawn by an exponential race (:mod:`engine_service.core.race_sampling`):
row i's draw at output step t is the argmax of its scores / T plus noise hashed from a key of
(seeds[i], t) (computed on the host) and the token index, in one read of the scores (a Triton kernel
on CUDA; no softmax is materialised). A seeded request gets the same tokens whatever else is in the
batch: its draw depends only on its seed, its step and its row's scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine_service.core.logit_masks import AllowedTokens, LogitBias, PendingBans, bad_word_bans, pending_bans
from engine_service.core.race_sampling import race_sample, row_keys
from engine_service.core.token_history import TokenPairs, history_pairs, token_pairs
from engine_service.sampling_params import SamplingParams
from qwen3.forward_batch import copy_to_device

if TYPE_CHECKING:
    from engine_service.core.structured_output import GrammarMask


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S] int64
    logprobs: torch.Tensor | None  # [S] float32 log-softmax of the raw logits at the chosen token
    top_logprobs_ids: torch.Tensor | None  # [S, N] int64, most likely first; N = max requested in the batch
    top_logprobs: torch.Tensor | None  # [S, N] float32


@dataclass
class SamplingBatch:
    """The sampling parameters of the S rows of one step, as device tensors.

    Neutral values stand in for disabled options (temperature 1 for greedy rows, top_k = vocab size,
    top_p 1, min_p 0, penalties 1 / 0), so every row can go through the same ops. The host-side flags
    say which steps some row needs, so that skipping work never synchronises with the device.
    """

    vocab_size: int
    greedy: torch.Tensor  # [S] bool
    temperature: torch.Tensor  # [S] float32; 1 for greedy rows
    top_k: torch.Tensor  # [S] int64 in [1, V]; V where disabled
    top_p: torch.Tensor  # [S] float32 in (0, 1]
    min_p: torch.Tensor  # [S] float32 in [0, 1]
    repetition_penalty: torch.Tensor  # [S] float32
    presence_penalty: torch.Tensor  # [S] float32
    frequency_penalty: torch.Tensor  # [S] float32
    keys: torch.Tensor  # [S] int64, the row's random key: a hash of (seed, output step)
    seen_tokens: TokenPairs | None  # prompt + output tokens of rows with a repetition penalty
    output_tokens: TokenPairs | None  # output tokens of rows with presence/frequency penalties
    banned_tokens: TokenPairs | None  # EOS and stop ids of rows still below min_tokens; bad_words' last ids
    logit_bias: LogitBias | None  # rows with a logit_bias
    allowed_tokens: AllowedTokens | None  # rows with allowed_token_ids
    pending_bans: PendingBans | None  # bad_words bans that hinge on a last token still on the device
    grammar: GrammarMask | None  # structured output: the constrained rows' token bitmask (set by the caller)
    all_greedy: bool
    max_top_k: int  # largest enabled top_k; 0 when no row uses top-k
    use_top_p: bool
    use_min_p: bool
    num_logprobs: int | None  # most top alternatives any row asked for; None: no row wants logprobs

    @property
    def has_penalties(self) -> bool:
        """Whether some row's scores change before the warpers (bias, penalties or bans)."""
        return any(
            x is not None
            for x in (
                self.seen_tokens,
                self.output_tokens,
                self.banned_tokens,
                self.logit_bias,
                self.allowed_tokens,
                self.pending_bans,
                self.grammar,
            )
        )

    @property
    def has_filters(self) -> bool:
        """Whether some row uses top-k, top-p or min-p."""
        return bool(self.max_top_k) or self.use_top_p or self.use_min_p

    @property
    def num_rows(self) -> int:
        return int(self.greedy.shape[0])

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        eos_token_ids: tuple[int, ...],
        seeds: list[int],
        vocab_size: int,
        device: torch.device | str,
        pending: list[bool] | None = None,
        pending_token_ids: torch.Tensor | None = None,
        grammar: GrammarMask | None = None,
    ) -> SamplingBatch:
        """Gather the per-row parameters of one step.

        ``output_token_ids[i]`` are row i's output ids known on the host. With one step in flight
        (async scheduling) a row may have one output token more, still on the device: ``pending[i]``
        says so, and ``pending_token_ids`` [S] int64, on ``device``, holds its id at that row (other
        rows' entries are ignored). The penalties read it there, so the host never waits for it.

        ``seeds[i]`` is row i's effective seed; its output step is its number of output tokens (known
        and pending), so the key it samples with depends on nothing but those two numbers.
        The penalties and bad_words read a pending id on the device; the host never waits for it.
        """
        num_rows = len(params)
        if num_rows == 0:
            raise ValueError("params: a sampling batch needs at least one row")
        if not num_rows == len(prompt_token_ids) == len(output_token_ids) == len(seeds):
            raise ValueError(
                f"params, prompt_token_ids, output_token_ids and seeds need one entry per row; got "
                f"{num_rows}, {len(prompt_token_ids)}, {len(output_token_ids)}, {len(seeds)}"
            )
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if pending is not None and len(pending) != num_rows:
            raise ValueError(f"pending needs one entry per row; got {len(pending)} for {num_rows} rows")
        num_outputs = (
            [len(o) for o in output_token_ids]
            if pending is None
            else [len(o) + p for o, p in zip(output_token_ids, pending)]
        )

        # [S, 11] float64 in SAMPLER_ROW's order: per-request constants cached on the params, so the only
        # per-row Python work of a step is this gather (a step of 256 rows runs on a host that must keep up).
        table = np.array([p.sampler_row for p in params], dtype=np.float64)
        greedy_col = table[:, 6] > 0
        raw_top_k = table[:, 7]
        top_k_col = np.where((raw_top_k > 0) & (raw_top_k < vocab_size), raw_top_k, vocab_size).astype(np.int64)
        host_ints = np.empty((num_rows, 3), dtype=np.int64)
        host_ints[:, 0], host_ints[:, 1], host_ints[:, 2] = greedy_col, top_k_col, row_keys(seeds, num_outputs)
        # Two host-to-device copies in all (queued, never waited for), then views.
        f = copy_to_device(torch.from_numpy(table[:, :6].astype(np.float32)), device)  # [S, 6]
        i = copy_to_device(torch.from_numpy(host_ints), device)  # [S, 3]
        # Whether any row uses a token control or a min_tokens ban decides whether the loops below run at all.
        controls = bool(table[:, 8].any())
        bad_words, conditional_bans = (
            bad_word_bans(params, output_token_ids, pending) if controls else ([[]] * num_rows, [])
        )
        max_logprobs = float(table[:, 9].max())
        repetition = table[:, 3] != 1.0
        counted = (table[:, 4] != 0.0) | (table[:, 5] != 0.0)
        bans_min_tokens = bool((table[:, 10] > np.asarray(num_outputs)).any())
        return cls(
            vocab_size=vocab_size,
            greedy=i[:, 0].bool(),
            temperature=f[:, 0],
            top_k=i[:, 1],
            top_p=f[:, 1],
            min_p=f[:, 2],
            repetition_penalty=f[:, 3],
            presence_penalty=f[:, 4],
            frequency_penalty=f[:, 5],
            keys=i[:, 2],
            seen_tokens=history_pairs(
                repetition.tolist(), prompt_token_ids, output_token_ids, pending, pending_token_ids, device
            )
            if repetition.any()
            else None,
            output_tokens=history_pairs(counted.tolist(), None, output_token_ids, pending, pending_token_ids, device)
            if counted.any()
            else None,
            banned_tokens=token_pairs(
                [
                    (*eos_token_ids, *p.stop_token_ids, *words) if n < p.min_tokens else words
                    for p, n, words in zip(params, num_outputs, bad_words)
                ],
                device,
            )
            if controls or bans_min_tokens
            else None,
            logit_bias=LogitBias.build(params, device) if controls else None,
            allowed_tokens=AllowedTokens.build(params, device) if controls else None,
            pending_bans=pending_bans(conditional_bans, pending_token_ids, device),
            grammar=grammar,
            all_greedy=bool(greedy_col.all()),
            max_top_k=int(top_k_col[top_k_col < vocab_size].max(initial=0)),
            use_top_p=bool((table[:, 1] < 1.0).any()),
            use_min_p=bool((table[:, 2] > 0.0).any()),
            num_logprobs=int(max_logprobs) if max_logprobs >= 0 else None,
        )


class Sampler:
    """Stateless: ``Sampler()(logits [S, V], batch) -> SamplerOutput``."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if batch.all_greedy and batch.num_logprobs is None and not batch.has_penalties:
            # Nothing changes the scores: argmax of the raw logits (exact in any float dtype, same ties),
            # without the [S, V] float32 copy. One kernel at batch 1 instead of two.
            self.check_shape(logits, batch)
            return SamplerOutput(logits.argmax(dim=-1), None, None, None)
        if batch.all_greedy:
            token_ids = self.processed_logits(logits, batch).argmax(dim=-1)  # [S]
        elif not batch.has_penalties and not batch.has_filters:
            # Temperature only: the race reads the raw logits once, in their own dtype.
            self.check_shape(logits, batch)
            token_ids = race_sample(logits, batch.temperature, batch.greedy, batch.keys)
        else:
            token_ids = race_sample(self.processed_logits(logits, batch), None, batch.greedy, batch.keys)

        out = SamplerOutput(token_ids, None, None, None)
        if batch.num_logprobs is not None:
            # Logprobs describe the model, not the sampler: log-softmax of the raw logits (vLLM's default).
            logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [S, V]
            out.logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
            if batch.num_logprobs:
                out.top_logprobs, out.top_logprobs_ids = logprobs.topk(batch.num_logprobs, dim=-1)
        return out

    def processed_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The scores of the next token, [S, V] float32 (a new tensor; ``logits`` is left alone): after
        penalties and min_tokens, and for sampled rows the warpers. Greedy rows take their argmax,
        sampled rows draw from their softmax."""
        self.check_shape(logits, batch)
        scores = self.apply_penalties(logits.to(torch.float32, copy=True), batch)
        return scores if batch.all_greedy else self.apply_warpers(scores, batch)

    @staticmethod
    def check_shape(logits: torch.Tensor, batch: SamplingBatch) -> None:
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows or logits.shape[1] != batch.vocab_size:
            raise ValueError(
                f"logits must have shape [{batch.num_rows}, {batch.vocab_size}] "
                f"(rows, vocab_size), got {list(logits.shape)}"
            )

    @staticmethod
    def apply_penalties(scores: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logit_bias, repetition, presence and frequency penalties, then the bans (allowed_token_ids,
        bad_words, min_tokens) and the structured-output mask, in place on ``scores``."""
        if batch.logit_bias is not None:
            batch.logit_bias.apply(scores)
        if batch.seen_tokens is not None:
            # As transformers' RepetitionPenaltyLogitsProcessor: shrink positive logits, grow negative ones.
            # Duplicate pairs write the same value, so they need no dedup.
            rows, tokens = batch.seen_tokens.rows, batch.seen_tokens.tokens
            seen = scores[rows, tokens]  # [P]
            penalty = batch.repetition_penalty[rows]  # [P]
            scores[rows, tokens] = torch.where(seen < 0, seen * penalty, seen / penalty)
        if batch.output_tokens is not None:
            # As vLLM / OpenAI: logit -= presence * (count > 0) + frequency * count, over generated tokens.
            counts = torch.zeros_like(scores)  # [S, V]
            rows, tokens = batch.output_tokens.rows, batch.output_tokens.tokens
            counts.index_put_((rows, tokens), torch.ones_like(rows, dtype=scores.dtype), accumulate=True)
            scores -= batch.frequency_penalty[:, None] * counts + batch.presence_penalty[:, None] * (counts > 0)
        if batch.allowed_tokens is not None:
            batch.allowed_tokens.apply(scores)
        if batch.banned_tokens is not None:
            scores[batch.banned_tokens.rows, batch.banned_tokens.tokens] = float("-inf")
        if batch.pending_bans is not None:
            batch.pending_bans.apply(scores)
        if batch.grammar is not None:
            batch.grammar.apply(scores)
        return scores

    @staticmethod
    def apply_warpers(scores: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p (transformers' warpers, each row with its own values), in place.

        Greedy rows carry neutral values, so they pass through unchanged.
        """
        scores.div_(batch.temperature[:, None])
        if batch.use_top_p:
            _top_k_top_p_by_sort(scores, batch)
        elif batch.max_top_k:
            _top_k(scores, batch)
        if batch.use_min_p:
            # As MinPLogitsWarper: drop tokens less likely than min_p times the most likely one
            # (which always survives since min_p <= 1).
            probs = scores.softmax(dim=-1)  # [S, V]
            threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [S, 1]
            scores.masked_fill_(probs < threshold, float("-inf"))
        return scores


# ---- warpers -------------------------------------------------------------------------------------


def _top_k(scores: torch.Tensor, batch: SamplingBatch) -> None:
    """As TopKLogitsWarper: drop tokens below the k-th largest score (ties with it survive), in place.

    One ``topk`` of the largest enabled k serves every row, avoiding a full sort.
    """
    top = scores.topk(batch.max_top_k, dim=-1).values  # [S, K]
    kth = top.gather(1, (batch.top_k.clamp(max=batch.max_top_k) - 1)[:, None])  # [S, 1]
    enabled = (batch.top_k < batch.vocab_size)[:, None]  # [S, 1]
    scores.masked_fill_((scores < kth) & enabled, float("-inf"))


def _top_k_top_p_by_sort(scores: torch.Tensor, batch: SamplingBatch) -> None:
    """Top-k then top-p from one ascending sort, in place, with the arithmetic of transformers'
    TopKLogitsWarper and TopPLogitsWarper (min_tokens_to_keep=1)."""
    sorted_scores, order = scores.sort(dim=-1)  # [S, V] ascending
    vocab = batch.vocab_size
    kth = sorted_scores.gather(1, (vocab - batch.top_k)[:, None])  # [S, 1]; V-th = smallest
    sorted_scores.masked_fill_(sorted_scores < kth, float("-inf"))
    # Drop the low tail whose total mass is at most 1 - top_p; the most likely token always stays.
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [S, V]
    drop = (cumulative <= (1 - batch.top_p)[:, None]) & (batch.top_p < 1)[:, None]  # [S, V]
    drop[:, -1] = False
    drop |= sorted_scores == float("-inf")  # the top-k cut
    scores.masked_fill_(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))
