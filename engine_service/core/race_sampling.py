"""The sampler's draw: an exponential race over the vocabulary, one read of the scores per row.

Row i draws ``argmax_j(scores[i, j] / T_i - log(E_ij))`` with ``E_ij`` independent Exp(1) variables
(equivalently scores / T plus Gumbel noise): token j wins with probability softmax(scores / T)[j]
exactly, so no softmax, no cumulative sum and no [S, V] probability tensor is ever written. Greedy
rows take the plain argmax (first index on ties, as ``torch.argmax``).

The seeded stream (counter-based, so a draw depends only on the row's own numbers and is CUDA-graph
safe): a row's key is ``splitmix64(splitmix64(seed) ^ step)`` (``row_key``, on the host), and entry j's
64 random bits are the j-th output of a SplitMix64 generator started at the key,
``splitmix64(key + j * GAMMA)``. Their top 52 bits give ``u = (m + 0.5) / 2^52`` in (0, 1), exact in
float64; ``E = -log(u)`` is taken in float64 (so that u near 1, where the winning token's E lies, keeps
its precision: the largest Gumbel value is ~36.7, not float32's ~16.6), then ``-log(E)`` and the sum
in float32.

Two implementations of the same function: :func:`race_sample_torch` (the definition; CPU tensors) and
a Triton kernel (CUDA tensors), which agree token for token except where two candidates' float32
keys tie within the last bit of a ``log`` (the two libraries' logs may round apart there).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from qwen3.kernels import use_triton_kernels

_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
GAMMA = 0x9E37_79B9_7F4A_7C15  # SplitMix64's increment (the golden ratio in 64 bits)
_MIX1 = 0xBF58_476D_1CE4_E5B9
_MIX2 = 0x94D0_49BB_1331_11EB


def splitmix64(x: int) -> int:
    """Steele et al.'s SplitMix64 step (add GAMMA, then the finaliser) on Python ints, exact 64-bit."""
    x = (x + GAMMA) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def row_key(seed: int, step: int) -> int:
    """The key of the draw at output ``step`` of a request seeded with ``seed`` (any int), as the signed
    int64 with the same 64 bits (what an int64 tensor holds)."""
    key = splitmix64(splitmix64(seed & _MASK64) ^ step)
    return key - (1 << 64) if key >> 63 else key


@functools.lru_cache(maxsize=1 << 16)
def _seed_state(seed: int) -> int:
    return splitmix64(seed & _MASK64)


def row_keys(seeds: list[int], steps: list[int]) -> np.ndarray:
    """[S] int64: ``row_key(seeds[i], steps[i])`` for a whole batch, in NumPy's wrapping uint64 arithmetic
    (a running request's seed half is cached), where a Python loop cost ~1 ms a step at 256 rows."""
    z = np.fromiter((_seed_state(s) for s in seeds), dtype=np.uint64, count=len(seeds))
    z ^= np.asarray(steps, dtype=np.uint64)
    z += np.uint64(GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return (z ^ (z >> np.uint64(31))).view(np.int64)


# ---- the definition, in PyTorch ---------------------------------------------------------------------


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _noise_bits(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[S, V] int64: splitmix64(keys[i] + j * GAMMA), in int64 arithmetic that wraps as uint64's does."""
    j = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    z = keys[:, None] + (j + 1) * _signed(GAMMA)  # [S, V]; the +1 is splitmix64's own GAMMA
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[S, V] float32: ``-log(E)`` of the stream above for row keys ``keys`` [S] int64."""
    u = (_shr(_noise_bits(keys, vocab), 12).to(torch.float64) + 0.5) * 2.0**-52  # in (0, 1), exact
    return -torch.log((-torch.log(u)).to(torch.float32))


def race_sample_torch(
    scores: torch.Tensor, temperature: torch.Tensor | None, greedy: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """The definition of :func:`race_sample`, in PyTorch (writes [S, V] temporaries)."""
    x = scores.to(torch.float32)  # [S, V]
    if temperature is not None:
        x = x / temperature[:, None]
    raced = (x + gumbel_noise(keys, scores.shape[1])).argmax(dim=-1)  # [S]
    return torch.where(greedy, scores.argmax(dim=-1), raced)


# ---- dispatch ---------------------------------------------------------------------------------------


def race_sample(
    scores: torch.Tensor, temperature: torch.Tensor | None, greedy: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """Next token per row: argmax for ``greedy`` rows, else a draw from softmax(scores / temperature).

    scores [S, V] float32/bf16/fp16 (raw logits or processed scores; -inf bans a token); temperature
    [S] float32 (> 0 on sampled rows) or None when ``scores`` are already divided; greedy [S] bool;
    keys [S] int64 (``row_key``). Returns [S] int64. CUDA tensors take the Triton kernel (one read of
    ``scores``, nothing [S, V] written), CPU tensors the PyTorch definition.
    """
    rows = scores.shape[0]
    for name, t, dtype in (("greedy", greedy, torch.bool), ("keys", keys, torch.int64)):
        if t.shape != (rows,) or t.dtype != dtype:
            raise ValueError(f"{name} must be [{rows}] {dtype}, got {list(t.shape)} {t.dtype}")
    if temperature is not None and (temperature.shape != (rows,) or temperature.dtype != torch.float32):
        raise ValueError(f"temperature must be [{rows}] float32, got {list(temperature.shape)} {temperature.dtype}")
    if use_triton_kernels(scores):
        from engine_service.core.race_sampling_kernel import race_sample_triton

        return race_sample_triton(scores, temperature, greedy, keys)
    return race_sample_torch(scores, temperature, greedy, keys)
