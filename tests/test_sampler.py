"""The sampler against transformers' logits processors, crafted logits, and the statistics of its draws."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine_service.core import sampler as sampler_module
from engine_service.core.race_sampling import row_key, splitmix64
from engine_service.core.sampler import Sampler, SamplingBatch
from engine_service.sampling_params import MAX_LOGPROBS, SamplingParams

EOS = (5, 6)


def build(
    params: list[SamplingParams],
    vocab: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    seeds: list[int] | None = None,
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
    )


def survivors(scores: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in scores]


def hf_reference(logits: torch.Tensor, p: SamplingParams, seen: list[int]) -> torch.Tensor:
    """One row through transformers' processors, in generate's order."""
    scores = logits[None].clone()  # [1, V]
    ids = torch.tensor([seen])
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    if p.is_greedy:
        return scores[0]
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    return scores[0]


# ---- SamplingParams -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("presence_penalty", 2.5),
        ("presence_penalty", float("-inf")),
        ("frequency_penalty", -2.1),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("min_tokens", 17),  # > max_tokens (16)
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("seed", 1.5),
        ("stop_token_ids", [3, -1]),
        ("stop_token_ids", "abc"),
    ],
)
def test_sampling_params_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_normalises_and_accepts_edges() -> None:
    p = SamplingParams(
        stop_token_ids=[3, 4],
        top_p=1.0,
        min_p=1.0,
        top_k=0,
        logprobs=MAX_LOGPROBS,
        min_tokens=16,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        seed=-5,
    )
    assert p.stop_token_ids == (3, 4) and isinstance(p.stop_token_ids, tuple)
    hash(p)  # frozen and hashable once lists became tuples
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy


# ---- crafted logits: which tokens survive ---------------------------------------------------------


def test_top_k_top_p_min_p_masks_on_crafted_logits() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    dyadic = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = torch.stack(
        [
            torch.tensor([1.0, 4.0, 2.0, 3.0]),  # top_k=2 -> the two largest
            torch.tensor([1.0, 3.0, 3.0, 0.0]),  # top_k=1 with a tie -> both tied tokens (as transformers)
            probs.log(),  # top_p=0.75 -> {0, 1} (0.5 + 0.3 >= 0.75)
            probs.log(),  # top_p=0.85 -> {0, 1, 2}
            probs.log(),  # top_p=0.3  -> the most likely token alone
            probs.log(),  # min_p=0.25 -> prob >= 0.125 -> {0, 1, 2}
            probs.log(),  # min_p=0.7  -> prob >= 0.35  -> {0}
            probs.log(),  # top_k=3, top_p=0.7 -> renormalised {0.53, 0.32, 0.16}: {0, 1}
            probs.log(),  # all disabled -> everything
            # Exact boundaries (dyadic probabilities 1/2, 1/4, 1/8, 1/8 are exact in float32), as transformers:
            dyadic.log(),  # top_p=0.75: the tail of mass exactly 0.25 goes -> {0, 1}
            dyadic.log(),  # min_p=0.5: a token at exactly 0.5 * max stays -> {0, 1}
        ]
    )
    params = [
        SamplingParams(top_k=2),
        SamplingParams(top_k=1),
        SamplingParams(top_p=0.75),
        SamplingParams(top_p=0.85),
        SamplingParams(top_p=0.3),
        SamplingParams(min_p=0.25),
        SamplingParams(min_p=0.7),
        SamplingParams(top_k=3, top_p=0.7),
        SamplingParams(),
        SamplingParams(top_p=0.75),
        SamplingParams(min_p=0.5),
    ]
    scores = Sampler().processed_logits(logits, build(params, vocab=4))
    assert survivors(scores) == [
        [1, 3],
        [1, 2],
        [0, 1],
        [0, 1, 2],
        [0],
        [0, 1, 2],
        [0],
        [0, 1],
        [0, 1, 2, 3],
        [0, 1],
        [0, 1],
    ]


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(3, 10)
    logits[:, EOS[0]] = 5.0  # EOS is by far the most likely token
    logits[:, 8] = 4.0  # a stop id, next most likely
    params = [
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[8]),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[8], ignore_eos=True),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[8]),
    ]
    outputs = [[1, 1], [1, 1], [1, 1, 1]]  # rows 0, 1 are below min_tokens; row 2 has reached it
    batch = build(params, vocab=10, outputs=outputs)
    scores = Sampler().processed_logits(logits, batch)
    for row in (0, 1):
        assert torch.isneginf(scores[row, [*EOS, 8]]).all()
        assert torch.isfinite(scores[row, [0, 1, 2, 3, 4, 7, 9]]).all()
    assert torch.isfinite(scores[2]).all()
    assert Sampler()(logits, batch).token_ids.tolist() == [0, 0, EOS[0]]


# ---- parity with transformers ---------------------------------------------------------------------


def random_params(rng: random.Random, vocab: int, knobs: str) -> SamplingParams:
    if rng.random() < 0.15:
        return SamplingParams(temperature=0.0, repetition_penalty=rng.choice([1.0, 1.3]))
    return SamplingParams(
        temperature=rng.uniform(0.3, 1.7),
        top_k=rng.choice([-1, 0, 1, 5, vocab // 3, vocab + 7]) if "k" in knobs else -1,
        top_p=rng.choice([1.0, rng.uniform(0.05, 0.99)]) if "p" in knobs else 1.0,
        min_p=rng.choice([0.0, rng.uniform(0.01, 0.3)]) if "m" in knobs else 0.0,
        repetition_penalty=rng.choice([1.0, rng.uniform(0.5, 2.0)]) if "r" in knobs else 1.0,
    )


@pytest.mark.parametrize("knobs", ["kpmr", "k", "p", "m", "r", "km"])
def test_penalties_and_warpers_match_transformers(knobs: str) -> None:
    rng = random.Random(knobs)
    torch.manual_seed(len(knobs))
    vocab, rows = 300, 12
    logits = torch.randn(rows, vocab) * 3
    params = [random_params(rng, vocab, knobs) for _ in range(rows)]
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 30))] for _ in range(rows)]
    outputs = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 20))] for _ in range(rows)]
    batch = build(params, vocab, prompts, outputs)

    got = Sampler().processed_logits(logits, batch)
    for i, p in enumerate(params):
        want = hf_reference(logits[i], p, prompts[i] + outputs[i])
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), f"row {i}: {p}"
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[i][finite], want[finite], msg=f"row {i}: {p}")
    assert torch.isfinite(got).any(dim=-1).all()


def test_presence_and_frequency_penalties_follow_the_openai_formula() -> None:
    vocab = 50
    torch.manual_seed(0)
    logits = torch.randn(3, vocab)
    params = [
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.3),
        SamplingParams(presence_penalty=-1.5),
        SamplingParams(frequency_penalty=2.0, repetition_penalty=1.5),
    ]
    prompts = [[1, 2], [3], [4, 9, 9]]
    outputs = [[7, 7, 7, 8, 1], [2, 2, 11], [9, 4, 4, 30]]
    got = Sampler().processed_logits(logits, build(params, vocab, prompts, outputs))

    for i, p in enumerate(params):
        # The repetition penalty comes first (transformers), then presence/frequency on generated tokens only.
        want = hf_reference(
            logits[i], SamplingParams(repetition_penalty=p.repetition_penalty, temperature=0.0), prompts[i] + outputs[i]
        )
        for token, count in Counter(outputs[i]).items():
            want[token] -= p.presence_penalty + p.frequency_penalty * count
        # temperature 1, no filters: processed scores are the penalised logits
        torch.testing.assert_close(got[i], want)


def test_penalties_read_a_pending_last_token_on_the_device() -> None:
    """Async scheduling: a last output token still on the device (``pending``; the host list lacks it)
    counts exactly as if the host knew it, for penalties, min_tokens and the draw's output step; rows
    without a pending token ignore ``pending_token_ids``."""
    vocab = 40
    torch.manual_seed(5)
    logits = torch.randn(4, vocab)
    # row 0: 3 known + 1 pending = min_tokens, so EOS is allowed only if the pending token counts
    params = [
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.3, min_tokens=4),
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(frequency_penalty=1.0, repetition_penalty=1.3, min_tokens=9),
        SamplingParams(),
    ]
    prompts = [[1, 2], [3], [4], [8]]
    known = [[7, 7, 8], [2, 11, 12], [9, 4], [6]]
    last = [7, 12, 33, 6]  # the real ids of the tokens still on the device
    pending = [True, True, False, True]
    outputs = [k if p else [*k, t] for k, t, p in zip(known, last, pending)]
    pending_ids = torch.tensor([t if p else 0 for t, p in zip(last, pending)])
    got_batch = SamplingBatch.build(
        params, prompts, outputs, EOS, [0, 1, 2, 3], vocab, "cpu", pending, pending_token_ids=pending_ids
    )
    want_batch = build(params, vocab, prompts, [[*k, t] for k, t in zip(known, last)])
    torch.testing.assert_close(
        Sampler().processed_logits(logits, got_batch), Sampler().processed_logits(logits, want_batch)
    )
    assert got_batch.keys.tolist() == want_batch.keys.tolist()
    with pytest.raises(ValueError, match="pending_token_ids"):
        SamplingBatch.build(params, prompts, outputs, EOS, [0, 1, 2, 3], vocab, "cpu", pending)
    with pytest.raises(ValueError, match="pending needs one entry per row"):
        SamplingBatch.build(params, prompts, outputs, EOS, [0, 1, 2, 3], vocab, "cpu", pending[:2])


def test_half_precision_logits_are_processed_in_float32_and_left_untouched() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 64).to(torch.bfloat16)
    before = logits.clone()
    params = [SamplingParams(top_p=0.8, repetition_penalty=1.2, seed=i) for i in range(4)]
    batch = build(params, 64, prompts=[[1, 2, 3]] * 4)
    got = Sampler().processed_logits(logits, batch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, Sampler().processed_logits(logits.float(), batch))
    out = Sampler()(logits, batch)
    assert torch.equal(logits, before)
    assert torch.equal(out.token_ids, Sampler()(logits.float(), batch).token_ids)


def test_greedy_takes_the_argmax_of_the_penalised_logits() -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, 100)
    params = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(temperature=0.0, repetition_penalty=3.0)] * 3
    top = logits.argmax(dim=-1)
    prompts = [[0]] * 3 + [[int(t)] for t in top[3:]]  # penalise the argmax of the last three rows
    out = Sampler()(logits, build(params, 100, prompts))
    want = hf_reference(logits[3], params[3], prompts[3]).argmax()
    assert out.token_ids[:3].tolist() == top[:3].tolist()
    assert out.token_ids[3] == want and want != top[3]
    assert out.logprobs is None and out.top_logprobs is None and out.top_logprobs_ids is None


def test_plain_greedy_batch_skips_the_float32_copy_and_keeps_first_index_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    logits = torch.randn(5, 300).to(torch.bfloat16)
    logits[0, 7] = logits[0, 250] = logits[0].max() + 1  # a tie: the first index wins, as before
    params = [SamplingParams(temperature=0.0)] * 5
    want = Sampler()(logits.float(), build(params, 300)).token_ids

    def forbidden(*args: object) -> None:
        raise AssertionError("the plain greedy path processed the logits")

    monkeypatch.setattr(Sampler, "processed_logits", forbidden)
    out = Sampler()(logits, build(params, 300))
    assert out.token_ids.tolist() == want.tolist() and out.token_ids[0] == 7
    with pytest.raises(ValueError, match="logits"):
        Sampler()(logits[:, :299], build(params, 300))


def test_skips_work_no_row_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object) -> None:
        raise AssertionError("called although no row needs it")

    monkeypatch.setattr(sampler_module, "_top_k_top_p_by_sort", forbidden)
    monkeypatch.setattr(sampler_module, "_top_k", forbidden)
    params = [SamplingParams(), SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.5)]
    batch = build(params, 20, outputs=[[1, 2], [3]])
    assert batch.seen_tokens is None and batch.output_tokens is None and batch.banned_tokens is None
    assert not batch.use_top_p and not batch.use_min_p and batch.max_top_k == 0 and batch.num_logprobs is None
    Sampler()(torch.randn(2, 20), batch)


def test_rejects_logits_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.randn(2, 21), build([SamplingParams()] * 2, 20))


# ---- seeded randomness ----------------------------------------------------------------------------


def test_row_keys_are_splitmix64_of_seed_and_step() -> None:
    # Published SplitMix64 outputs (Vigna's splitmix64.c) for states 0 and 1234567.
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(1234567) == 6457827717110365317
    batch = build([SamplingParams()] * 4, 10, outputs=[[], [0], [], [0]], seeds=[3, 3, 3, -1])
    keys = batch.keys.tolist()
    assert batch.keys.dtype == torch.int64
    assert keys[0] == keys[2] and len(set(keys)) == 3  # same (seed, step) -> same key
    assert keys[1] % (1 << 64) == splitmix64(splitmix64(3) ^ 1) and keys[1] == row_key(3, 1)


def test_temperature_only_batches_race_on_the_raw_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """No penalty and no filter in the batch: the draw reads the logits as given (one pass, their own
    dtype) and divides by the temperature itself; any filter sends the processed scores instead, already
    divided. Both give a row the same token."""
    torch.manual_seed(8)
    logits = torch.randn(3, 64).to(torch.bfloat16)
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    original = sampler_module.race_sample

    def spy(scores: torch.Tensor, temperature: torch.Tensor | None, *rest: torch.Tensor) -> torch.Tensor:
        seen.append((scores, temperature))
        return original(scores, temperature, *rest)

    monkeypatch.setattr(sampler_module, "race_sample", spy)
    plain = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0), SamplingParams(temperature=1.3)]
    fast = Sampler()(logits, build(plain, 64)).token_ids
    assert seen[0][0] is logits and seen[0][1] is not None
    filtered = Sampler()(logits, build([*plain[:2], SamplingParams(temperature=1.3, top_p=0.999999)], 64)).token_ids
    assert seen[1][0].dtype == torch.float32 and seen[1][1] is None
    assert fast[:2].tolist() == filtered[:2].tolist()  # rows 0 and 1 are the same rows in both batches


def test_seeded_draws_do_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(3)
    vocab = 200
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    others = [SamplingParams(temperature=1.3), SamplingParams(temperature=0.0), SamplingParams(top_k=4)]
    alone, crowded, other_seed = [], [], []
    for step in range(30):
        row = torch.randn(vocab)
        outputs = [[0] * step]
        alone += Sampler()(row[None], build([target], vocab, outputs=outputs, seeds=[1234])).token_ids.tolist()
        batch = build(
            [others[0], others[1], target, others[2]],
            vocab,
            outputs=[[1] * 3, [], [0] * step, [2] * 9],
            seeds=[7, 8, 1234, 9],
        )
        logits = torch.randn(4, vocab)
        logits[2] = row
        crowded.append(Sampler()(logits, batch).token_ids[2].item())
        other_seed += Sampler()(row[None], build([target], vocab, outputs=outputs, seeds=[99])).token_ids.tolist()
    assert alone == crowded
    assert sum(a != b for a, b in zip(alone, other_seed)) > 20


def test_each_step_draws_fresh_noise() -> None:
    logits = torch.zeros(200, 50)  # uniform over 50 tokens, same seed, steps 0..199
    batch = build([SamplingParams()] * 200, 50, outputs=[[0] * t for t in range(200)], seeds=[42] * 200)
    assert len(set(Sampler()(logits, batch).token_ids.tolist())) > 40


def chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    counts = Counter(tokens)
    expected = probs * len(tokens)
    return sum((counts.get(j, 0) - e) ** 2 / e for j, e in enumerate(expected.tolist()) if e > 0)


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(temperature=0.6, top_k=6), SamplingParams(top_p=0.8, min_p=0.05)]
)
def test_draws_follow_the_warped_distribution(params: SamplingParams) -> None:
    torch.manual_seed(4)
    vocab, draws = 8, 20_000
    logits = torch.randn(vocab) * 1.5
    want = hf_reference(logits, params, []).softmax(dim=-1)  # [V], zeros where filtered
    batch = build([params] * draws, vocab, seeds=list(range(draws)))
    tokens = Sampler()(logits.expand(draws, vocab), batch).token_ids.tolist()

    assert all(want[t] > 0 for t in set(tokens)), "drew a filtered token"
    df = int((want > 0).sum()) - 1
    # 99.9th percentile of chi-square with df <= 7 is at most 24.3; the draws are deterministic.
    assert chi_square(tokens, want) < 24.3, (df, Counter(tokens), want)


def test_draws_over_steps_of_one_seed_follow_the_distribution() -> None:
    torch.manual_seed(5)
    vocab, steps = 8, 3000
    logits = torch.randn(vocab)
    batch = build([SamplingParams(seed=7)] * steps, vocab, outputs=[[0] * t for t in range(steps)], seeds=[7] * steps)
    tokens = Sampler()(logits.expand(steps, vocab), batch).token_ids.tolist()
    assert chi_square(tokens, logits.softmax(dim=-1)) < 24.3


# ---- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_logits_with_sorted_top_n() -> None:
    torch.manual_seed(6)
    vocab = 40
    logits = torch.randn(3, vocab)
    params = [
        SamplingParams(logprobs=None),
        SamplingParams(logprobs=0, repetition_penalty=2.0),
        SamplingParams(logprobs=3, temperature=0.0, presence_penalty=1.0),
    ]
    out = Sampler()(logits, build(params, vocab, prompts=[[1, 2]] * 3, outputs=[[3]] * 3))
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_logprobs.shape == out.top_logprobs_ids.shape == (3, 3)
    torch.testing.assert_close(out.top_logprobs, ref.gather(1, out.top_logprobs_ids))
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert out.top_logprobs_ids.tolist() == ref.argsort(dim=-1, descending=True)[:, :3].tolist()

    only_chosen = Sampler()(logits, build([SamplingParams(logprobs=0)] * 3, vocab))
    assert only_chosen.logprobs is not None and only_chosen.top_logprobs is None
    assert only_chosen.top_logprobs_ids is None
