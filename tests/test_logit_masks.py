"""logit_bias, allowed_token_ids and bad_words in the sampler: what they guarantee over many seeds, and the
batched mask path against a plain-torch reference applied one request at a time."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from engine_service.core import logit_masks
from engine_service.core.sampler import Sampler, SamplingBatch
from engine_service.sampling_params import SamplingParams

EOS = (5, 6)


def build(
    params: list[SamplingParams],
    vocab: int,
    outputs: list[list[int]] | None = None,
    seeds: list[int] | None = None,
    prompts: list[list[int]] | None = None,
    pending: list[bool] | None = None,
    pending_token_ids: torch.Tensor | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params,
        prompts or [[0]] * n,
        outputs or [[]] * n,
        EOS,
        seeds if seeds is not None else list(range(n)),
        vocab,
        "cpu",
        pending,
        pending_token_ids,
    )


def draws(params: SamplingParams, logits: torch.Tensor, seeds: range) -> list[int]:
    """The token each seed draws from ``logits`` [V] at output step 0, all seeds in one batch."""
    batch = build([params] * len(seeds), logits.shape[0], seeds=list(seeds))
    return Sampler()(logits.expand(len(seeds), -1).contiguous(), batch).token_ids.tolist()


def reference(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """One request's scores [V] before the warpers, each rule written out plainly for one row."""
    scores = logits.clone().float()
    for token, bias in p.logit_bias:
        scores[token] += bias
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([prompt + output]), scores[None])[
            0
        ]
    if p.allowed_token_ids is not None:
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[list(p.allowed_token_ids)] = True
        scores[~keep] = float("-inf")
    for word in p.bad_words:
        prefix = list(word[:-1])
        if len(prefix) <= len(output) and output[len(output) - len(prefix) :] == prefix:
            scores[word[-1]] = float("-inf")
    if len(output) < p.min_tokens:
        scores[[*EOS, *p.stop_token_ids]] = float("-inf")
    return scores


# ---- guarantees over many seeds ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.8])
def test_a_bias_of_minus_100_never_yields_the_token_and_plus_100_forces_it(temperature: float) -> None:
    torch.manual_seed(0)
    vocab = 64
    logits = torch.randn(vocab) * 3
    top, bottom = int(logits.argmax()), int(logits.argmin())
    logits[top] += 5.0  # the favourite by a wide margin
    banned = draws(SamplingParams(temperature=temperature, logit_bias={top: -100}), logits, range(2000))
    assert top not in banned
    forced = draws(SamplingParams(temperature=temperature, logit_bias={bottom: 100}), logits, range(2000))
    assert set(forced) == {bottom}
    unbiased = draws(SamplingParams(temperature=temperature), logits, range(2000))
    assert top in unbiased and bottom not in unbiased  # the biases, not the logits, decided


@pytest.mark.parametrize("extra", [{}, {"top_k": 3}, {"top_p": 0.5}, {"min_p": 0.2}, {"temperature": 0.0}])
def test_allowed_token_ids_are_the_only_tokens_ever_drawn(extra: dict) -> None:
    torch.manual_seed(1)
    vocab = 100
    logits = torch.randn(vocab) * 4
    allowed = (3, 17, 42, 99)
    logits[list(allowed)] -= 6.0  # unlikely without the restriction
    got = draws(SamplingParams(allowed_token_ids=allowed, **extra), logits, range(1500))
    assert set(got) <= set(allowed)
    if not extra or "top_k" in extra:
        assert len(set(got)) > 1  # sampled among them, not stuck on one


def test_bad_words_are_never_completed_while_generating() -> None:
    """A toy model whose next-token logits depend on the last token and strongly favour every banned
    completion: 300 steps for each of 40 seeds never complete a banned sequence."""
    vocab = 12
    torch.manual_seed(2)
    table = torch.randn(vocab, vocab)  # [last token, next token]
    bad = [[1, 2], [7], [2, 3, 4], [4, 4]]
    table[1, 2] = table[3, 4] = table[4, 4] = 8.0  # what the model would say next, by far
    table[:, 7] = 6.0
    table[:, 1] = table[:, 3] = 3.0  # and it often writes the prefixes
    params = [SamplingParams(bad_words=bad, max_tokens=400, seed=s) for s in range(40)]
    outputs: list[list[int]] = [[0] for _ in params]
    for _ in range(300):
        logits = table[[out[-1] for out in outputs]]
        tokens = Sampler()(logits, build(params, vocab, outputs, seeds=list(range(40)))).token_ids.tolist()
        for out, token in zip(outputs, tokens):
            out.append(token)
    text = [" ".join(map(str, out)) + " " for out in outputs]
    for word in bad:
        assert not any(f" {' '.join(map(str, word))} " in f" {t}" for t in text), word
    # The prefixes themselves are written (only their completion is banned).
    assert sum(t.count(" 1 ") + t.startswith("1 ") for t in text) > 100
    assert sum(t.count(" 2 3 ") for t in text) > 10


# ---- the batched mask path against one request at a time --------------------------------------------


def mixed_batch(rng: random.Random, vocab: int, rows: int) -> tuple[list[SamplingParams], list[list[int]]]:
    params, outputs = [], []
    for _ in range(rows):
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        kwargs: dict = {"temperature": rng.choice([0.0, 1.0])}
        if rng.random() < 0.5:
            kwargs["logit_bias"] = {rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(rng.randrange(1, 6))}
        if rng.random() < 0.4:
            kwargs["allowed_token_ids"] = rng.sample(range(vocab), rng.randrange(1, 10))
        if rng.random() < 0.5:
            # Words that the output ends with (banned now), others that it does not, one-id words.
            words = [[*output[-k:], rng.randrange(vocab)] for k in range(1, min(3, len(output)) + 1)]
            words += [[rng.randrange(vocab) for _ in range(rng.randrange(1, 4))] for _ in range(3)]
            kwargs["bad_words"] = words
        if rng.random() < 0.3:
            kwargs["min_tokens"], kwargs["stop_token_ids"] = 10, [rng.randrange(vocab)]
        if rng.random() < 0.3:
            kwargs["repetition_penalty"] = 1.4
        params.append(SamplingParams(**kwargs))
        outputs.append(output)
    return params, outputs


@pytest.mark.parametrize("seed", range(6))
def test_mask_path_matches_a_per_request_reference_on_a_mixed_batch(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    vocab, rows = 40, 16
    params, outputs = mixed_batch(rng, vocab, rows)
    prompts = [[rng.randrange(vocab) for _ in range(3)] for _ in range(rows)]
    logits = torch.randn(rows, vocab) * 2
    got = Sampler().processed_logits(logits, build(params, vocab, outputs, prompts=prompts))
    for i, p in enumerate(params):
        want = reference(logits[i], p, prompts[i], outputs[i])
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), f"row {i}: {p}"
        torch.testing.assert_close(got[i][torch.isfinite(want)], want[torch.isfinite(want)], msg=f"row {i}: {p}")

    # Each row draws what it draws alone: the features of the other rows change nothing.
    seeds = list(range(100, 100 + rows))
    together = Sampler()(logits, build(params, vocab, outputs, seeds, prompts)).token_ids.tolist()
    alone = [
        Sampler()(logits[i : i + 1], build([p], vocab, [outputs[i]], [seeds[i]], [prompts[i]])).token_ids.item()
        for i, p in enumerate(params)
    ]
    assert together == alone


def test_bad_words_read_a_pending_last_token_on_the_device() -> None:
    """Async scheduling: with the last output id still on the device, a ban that hinges on it holds exactly
    when that id (gathered on the device) completes the prefix, as if the host knew it."""
    vocab = 20
    torch.manual_seed(4)
    logits = torch.randn(4, vocab)
    params = [SamplingParams(bad_words=[[3, 4, 9], [4, 8], [11]])] * 4
    known = [[1, 3], [1, 3], [2, 4], [7]]
    last = [4, 5, 4, 4]  # row 0: "3 4" -> 9 and "4" -> 8 banned; row 1: neither; ...
    got = Sampler().processed_logits(
        logits, build(params, vocab, known, pending=[True] * 4, pending_token_ids=torch.tensor(last))
    )
    want = Sampler().processed_logits(logits, build(params, vocab, [[*k, t] for k, t in zip(known, last)]))
    assert torch.equal(got, want)
    assert torch.isneginf(got[0, [9, 8, 11]]).all() and torch.isfinite(got[1, [8, 9]]).all()
    with pytest.raises(ValueError, match="pending_token_ids"):
        build(params, vocab, known, pending=[True] * 4)
    assert SamplingParams(bad_words=[[3, 4]]).reads_token_history  # so the engine hands the pending ids over
    assert not SamplingParams(bad_words=[[3]]).reads_token_history


def test_a_batch_without_the_features_builds_and_applies_none_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object) -> None:
        raise AssertionError("applied although no row uses it")

    for cls in (logit_masks.LogitBias, logit_masks.AllowedTokens, logit_masks.PendingBans):
        monkeypatch.setattr(cls, "apply", forbidden)
    params = [SamplingParams(), SamplingParams(temperature=0.0, repetition_penalty=1.2), SamplingParams(top_k=3)]
    batch = build(params, 30, outputs=[[1, 2], [3], []])
    assert batch.logit_bias is None and batch.allowed_tokens is None and batch.pending_bans is None
    assert batch.banned_tokens is None
    Sampler()(torch.randn(3, 30), batch)
    plain_greedy = build([SamplingParams(temperature=0.0)] * 2, 30)
    assert not plain_greedy.has_penalties  # the argmax-only fast path stays open


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"logit_bias": {5: 100.5}}, r"logit_bias\[5\]"),
        ({"logit_bias": {5: float("inf")}}, r"logit_bias\[5\]"),
        ({"logit_bias": {-3: 1.0}}, "logit_bias"),
        ({"logit_bias": 7}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [1, -1]}, "allowed_token_ids"),
        ({"bad_words": [[1], []]}, r"bad_words\[1\]"),
        ({"bad_words": [[1, 2.5]]}, r"bad_words\[0\]"),
        ({"bad_words": "abc"}, "bad_words"),
    ],
)
def test_sampling_params_reject_bad_controls_naming_the_entry(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_controls() -> None:
    p = SamplingParams(logit_bias={9: 1, 2: -100.0}, allowed_token_ids=[4, 2], bad_words=[[1, 2], (3,)])
    assert p.logit_bias == ((2, -100.0), (9, 1.0)) and p.allowed_token_ids == (4, 2)
    assert p.bad_words == ((1, 2), (3,))
    hash(p)


def test_controls_keep_async_scheduling_token_exact(tiny_checkpoint) -> None:
    """The engine with one step in flight (bad_words then compare a last token still on the device) gives the
    same tokens as one step at a time, for a batch mixing the controls with plain requests."""
    from engine_service import LLM

    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = [[3, 17, 250, 9], [44, 8], [100, 101, 102], [7] * 5]
    with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64) as llm:
        greedy = [o.token_ids for o in llm.generate(prompts, plain)]
    pairs = [[a, b] for a, b in zip(greedy[0], greedy[0][1:])]
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, bad_words=pairs),
        SamplingParams(
            temperature=1.0,
            seed=3,
            max_tokens=24,
            ignore_eos=True,
            bad_words=[greedy[1][:3]],
            logit_bias={greedy[1][0]: -100.0},
        ),
        SamplingParams(temperature=1.0, seed=4, max_tokens=24, ignore_eos=True, allowed_token_ids=[5, 50, 500]),
        plain,
    ]
    runs = []
    for overlap in (False, True):
        with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64, async_scheduling=overlap) as llm:
            runs.append([o.token_ids for o in llm.generate(prompts, params)])
    assert runs[0] == runs[1]
    got = runs[1]
    assert got[0] != greedy[0] and not {tuple(got[0][i : i + 2]) for i in range(23)} & {tuple(p) for p in pairs}
    assert greedy[1][0] not in got[1] and set(got[2]) <= {5, 50, 500} and got[3] == greedy[3]
