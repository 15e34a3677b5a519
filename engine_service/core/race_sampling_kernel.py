"""The exponential-race draw of :mod:`engine_service.core.race_sampling` as a Triton kernel (CUDA tensors).

Stage 1, grid (rows, vocab chunks): each program reads its chunk of the row's scores once, adds the
in-kernel noise (SplitMix64 of the row key and the token index, no random state in memory), and writes
its best (value, first index) to a [S, C] scratch. Stage 2 (two small torch ops on [S, C]) picks the
first chunk holding the row's maximum. Chunks, not one program per row, keep batch 1 spread over the
GPU: a 152k vocab is 38 programs per row.

Bytes at 256 rows x 151,936 (bf16 logits): 78 MB read, ~80 KB written, where the softmax path writes
and re-reads several [S, V] float32 tensors (docs/BENCHMARKS.md has the prediction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024  # scores per inner iteration
_CHUNK = 4096  # scores per program


@triton.jit
def _race_kernel(
    scores_ptr,
    stride_row,
    temperature_ptr,
    greedy_ptr,
    keys_ptr,
    best_val_ptr,
    best_idx_ptr,
    vocab,
    num_chunks,
    HAS_TEMPERATURE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    sampled = tl.load(greedy_ptr + row) == 0
    key = tl.load(keys_ptr + row).to(tl.uint64, bitcast=True)
    temperature = 1.0
    if HAS_TEMPERATURE:
        temperature = tl.load(temperature_ptr + row)
    start = chunk * CHUNK
    run_val = tl.full((), float("-inf"), tl.float32)
    run_idx = tl.full((), 0, tl.int64) + start
    for offset in range(0, CHUNK, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)  # [BLOCK]
        inside = cols < vocab
        x = tl.load(scores_ptr + row * stride_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
        if HAS_TEMPERATURE:
            x = x / temperature  # a division, as the torch path's: the same float32 result
        if sampled:
            # splitmix64(key + j * GAMMA), in uint64 arithmetic (wrapping; >> is logical on unsigned).
            z = key + (cols.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB
            z = z ^ (z >> 31)
            u = ((z >> 12).to(tl.float64) + 0.5) * 2.220446049250313e-16  # (m + 0.5) / 2^52 in (0, 1)
            e = -tl.log(u)  # Exp(1), float64: u near 1 keeps its precision
            x = x - tl.log(e.to(tl.float32))
        block_max = tl.max(x, axis=0)
        block_idx = tl.min(tl.where(x == block_max, cols, vocab), axis=0)  # first index of the max
        if block_max > run_val:  # strict: an earlier index keeps a tie
            run_val = block_max
            run_idx = block_idx.to(tl.int64)
    tl.store(best_val_ptr + row * num_chunks + chunk, run_val)
    tl.store(best_idx_ptr + row * num_chunks + chunk, run_idx)


def race_sample_triton(
    scores: torch.Tensor, temperature: torch.Tensor | None, greedy: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """As ``race_sample`` (arguments checked there); scores [S, V] with a contiguous last dimension.
    Graph-safe: no host synchronisation, fixed shapes for fixed (S, V)."""
    if scores.stride(1) != 1:
        raise ValueError(f"scores must have a contiguous last dimension, got strides {scores.stride()}")
    rows, vocab = scores.shape
    num_chunks = triton.cdiv(vocab, _CHUNK)
    best_val = torch.empty((rows, num_chunks), dtype=torch.float32, device=scores.device)  # [S, C]
    best_idx = torch.empty((rows, num_chunks), dtype=torch.int64, device=scores.device)  # [S, C]
    if rows:
        _race_kernel[(rows, num_chunks)](
            scores,
            scores.stride(0),
            temperature if temperature is not None else best_val,  # unread without a temperature
            greedy,
            keys,
            best_val,
            best_idx,
            vocab,
            num_chunks,
            HAS_TEMPERATURE=temperature is not None,
            CHUNK=_CHUNK,
            BLOCK=_BLOCK,
            num_warps=4,
        )
    # The first chunk holding the row's maximum: chunks are in index order, each kept its first index.
    return best_idx.gather(1, best_val.argmax(dim=1, keepdim=True)).squeeze(1)  # [S]
