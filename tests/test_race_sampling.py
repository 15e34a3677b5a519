"""The exponential-race draw (engine_service.core.race_sampling): its random stream, its distribution
against torch.multinomial over the softmax, and the Triton kernel against the PyTorch definition under
the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is imported, hence a subprocess running
this file)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from engine_service.core.race_sampling import (
    GAMMA,
    _noise_bits,
    race_sample,
    race_sample_torch,
    row_key,
    row_keys,
    splitmix64,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None


def keys_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.tensor([row_key(seed, step) for step in range(n)], dtype=torch.int64)


def test_noise_bits_are_the_splitmix64_stream_of_the_row_key() -> None:
    keys = torch.tensor([row_key(s, t) for s, t in [(0, 0), (1, 5), (-3, 2), (2**63 - 1, 7)]])
    got = _noise_bits(keys, 6)
    for row, key in enumerate(keys.tolist()):
        want = [splitmix64((key + j * GAMMA) % (1 << 64)) for j in range(6)]
        assert [b % (1 << 64) for b in got[row].tolist()] == want


def test_batched_row_keys_equal_the_scalar_definition() -> None:
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 2**64 + 5, 12345, 12345]
    steps = [0, 1, 2, 3, 4, 5, 0, 2**20]
    assert row_keys(seeds, steps).tolist() == [row_key(s, t) for s, t in zip(seeds, steps)]


def test_greedy_rows_take_the_first_argmax_and_banned_tokens_never_win() -> None:
    torch.manual_seed(0)
    scores = torch.randn(400, 30)
    scores[:, 5:] = float("-inf")  # only tokens 0..4 are allowed
    scores[0, 1] = scores[0, 3] = 50.0  # a tie on a greedy row: the first index wins
    greedy = torch.zeros(400, dtype=torch.bool)
    greedy[0] = True
    tokens = race_sample(scores, torch.full((400,), 2.0), greedy, keys_for(400))
    assert tokens[0] == 1
    assert tokens.max() < 5 and len(set(tokens[1:].tolist())) == 5


def test_rejects_malformed_arguments() -> None:
    scores = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="keys must be"):
        race_sample(scores, None, torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="greedy must be"):
        race_sample(scores, None, torch.zeros(2, dtype=torch.bool), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="temperature must be"):
        race_sample(scores, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool), keys_for(3))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_draws_match_multinomial_over_the_softmax(temperature: float) -> None:
    """Two-sample chi-square: 40,000 race draws (one seed, 40,000 steps) against 40,000 draws of
    torch.multinomial over softmax(logits / T), on 12 tokens spanning ~4 orders of magnitude."""
    torch.manual_seed(11)
    vocab, draws = 12, 40_000
    logits = torch.linspace(-4.0, 4.0, vocab)[torch.randperm(vocab)]
    race = race_sample_torch(
        logits.expand(draws, vocab),
        torch.full((draws,), temperature),
        torch.zeros(draws, dtype=torch.bool),
        keys_for(draws, 7),
    ).tolist()
    gen = torch.Generator().manual_seed(12)
    reference = torch.multinomial(
        (logits / temperature).softmax(dim=-1), draws, replacement=True, generator=gen
    ).tolist()
    a, b = Counter(race), Counter(reference)
    stat = sum((a[j] - b[j]) ** 2 / (a[j] + b[j]) for j in range(vocab) if a[j] + b[j])
    # 99.9th percentile of chi-square with 11 degrees of freedom is 31.3; both streams are seeded.
    assert stat < 31.3, (stat, sorted(a.items()), sorted(b.items()))
    # And the rarest token (p ~ 1e-4 at T = 0.5) is drawn at its rate, not cut off.
    rare = int(logits.argmin())
    p_rare = float((logits / temperature).softmax(dim=-1)[rare])
    assert abs(a[rare] - p_rare * draws) < 5 * (p_rare * draws) ** 0.5 + 3


def test_a_seeded_row_draws_the_same_tokens_run_to_run() -> None:
    torch.manual_seed(13)
    scores = torch.randn(64, 1000)
    args = (scores, torch.full((64,), 0.8), torch.zeros(64, dtype=torch.bool), keys_for(64, 99))
    assert race_sample(*args).tolist() == race_sample(*args).tolist()
    other = race_sample(scores, args[1], args[2], keys_for(64, 100))
    assert (other != race_sample(*args)).sum() > 32


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
def test_kernel_matches_torch_under_triton_interpreter() -> None:
    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not last.startswith("{"):
        pytest.fail(f"interpreter run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads(last)
    assert len(report) >= 8, report
    assert all(v == "same" for v in report.values()), report


def _interpreter_cases() -> dict[str, str]:
    """Kernel vs definition on rows that cross chunk edges (V = 9,000: three 4,096 chunks, the last short),
    -inf bans, greedy rows with ties, a temperature or none, fp32 and fp16."""
    from engine_service.core.race_sampling_kernel import race_sample_triton

    report = {}
    for dtype in (torch.float32, torch.float16):
        for vocab in (9000, 100):
            torch.manual_seed(vocab)
            rows = 24
            scores = (torch.randn(rows, vocab) * 3).to(dtype)
            scores[2, 50:] = float("-inf")  # a row with few candidates
            scores[3, :] = float("-inf")
            scores[3, vocab - 1] = 0.0  # only the very last token
            greedy = torch.arange(rows) % 3 == 1
            scores[1, vocab // 2] = scores[1, vocab - 1] = 100.0  # greedy tie across chunks: first wins
            keys = keys_for(rows, vocab)
            for name, temperature in (("T", torch.rand(rows) + 0.3), ("no T", None)):
                got = race_sample_triton(scores, temperature, greedy, keys)
                want = race_sample_torch(scores, temperature, greedy, keys)
                ok = got.tolist() == want.tolist() and got[1] == vocab // 2 and got[3] == vocab - 1
                report[f"{dtype} V={vocab} {name}"] = "same" if ok else f"{got.tolist()} != {want.tolist()}"
    return report


if __name__ == "__main__":  # the interpreter subprocess
    from test_attention_backends_cpu import _patch_interpreter_scalar_index

    _patch_interpreter_scalar_index()
    print(json.dumps(_interpreter_cases()))
