"""``y = x W^T + b`` for a few rows of x: the decode steps' linear layers, which are weight-read bound.

At batch 1 a decode step multiplies one activation row by every weight matrix once: the work is reading the
weights (0.6B: ~1.2 GB a token, ~0.28 ms at 4.24 TB/s), but cuBLAS's M=1 GEMMs reach about a third of the copy
ceiling there (docs/BENCHMARKS.md, section 6). This kernel is built for that shape: each program streams a
[BLOCK_N, K-range] slab of W once, contiguous rows, and keeps every x row it needs in registers.

- M == 1 (and any M with ``BLOCK_M == 1``): multiply-and-reduce on CUDA cores, no padding;
- 2 <= M <= ``GEMV_MAX_M``: ``tl.dot`` on x padded to 16 rows (the tensor cores' minimum; the padding costs no
  memory traffic, only idle MMA lanes, and the kernel is bound by the weight read anyway);
- split-K when the N tiles alone would leave SMs idle (o_proj and down_proj: N = hidden): the K range is cut
  into ``SPLIT_K`` parts, each part writes an fp32 partial, and the last program of a tile to finish (an
  atomic counter per tile) sums the partials in a fixed order, adds the bias, rounds once and resets the
  counter, so one launch does it all, and replays of a CUDA graph find the counters at zero.

Rounding: fp32 accumulation, bias added in fp32, one rounding to the output dtype: what cuBLAS's bf16 GEMM
with a bias epilogue does, up to summation order.

Programmatic dependent launch (Hopper and later, ``QWEN3_PDL=1``; off by default until measured): the launch
lets the kernel start while the previous kernel finishes; each program loads its first W tile, then waits
(``gdc_wait``) for the previous kernel's writes before reading x. Without the switch the same code runs with
no wait, launched normally (the CPU tests run that path under the Triton interpreter, which cannot run PTX).

Counters: one int32 buffer per device, shared by every call (kernels on one stream run one after another,
and each tile's last program leaves its counter at zero). A split-K launch on two streams at once would race:
this engine runs one stream per device. The buffer is made on the first split-K call outside graph capture;
a call during capture before that falls back to no split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from qwen3.kernels import GEMV_MAX_M, pdl_enabled

#: split-K tiles per launch at most (the size of the counter buffer)
MAX_SPLIT_TILES = 4096


@dataclass(frozen=True)
class GemvConfig:
    """Tile sizes of one launch. ``block_m`` 1 = the CUDA-core path (M must be 1); 16 = the tl.dot path."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def check(self, m: int, k: int) -> None:
        if self.block_m not in (1, 16) or (self.block_m == 1 and m != 1):
            raise ValueError(f"block_m must be 1 (M = 1 only) or 16, got {self.block_m} for M = {m}")
        for name, value in (("block_n", self.block_n), ("block_k", self.block_k)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.block_m == 16 and (self.block_n < 16 or self.block_k < 16):
            raise ValueError("the tl.dot path needs block_n and block_k >= 16")
        if not 1 <= self.split_k <= max(1, triton.cdiv(k, self.block_k)):
            raise ValueError(f"split_k must be in 1..{max(1, triton.cdiv(k, self.block_k))}, got {self.split_k}")


@triton.jit
def _rows_times_x(w_rows, x_rows, n_mask, m_mask, k_begin, k_end, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, WAIT):
    """[BLOCK_M, BLOCK_N] fp32: x[:, k_begin:k_end] times the W rows ``w_rows`` [BLOCK_N, 1] (pointers).

    W's first tile is loaded before anything else: the weights are never written by an earlier kernel, so
    with programmatic dependent launch this load overlaps the previous kernel's tail. ``WAIT``: then wait
    (gdc_wait) until the previous kernel's writes (x, and the memory the output reuses) are complete and
    visible; every program passes there (no early exit), so no later kernel can overtake them."""
    rk = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    kk = k_begin + rk
    w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < k_end)[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
    if WAIT:
        gdc_wait()
    if BLOCK_M == 1:
        # CUDA cores: element-wise products summed per lane, one cross-lane reduction at the end (not one per step)
        lanes = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk < k_end)[None, :], other=0.0)  # [1, BLOCK_K]
            lanes += w.to(tl.float32) * x.to(tl.float32)
            kk_next = kk + BLOCK_K  # the next tile (masked off past the range's end)
            w = tl.load(w_rows + kk_next[None, :], mask=n_mask[:, None] & (kk_next < k_end)[None, :], other=0.0)
        acc = tl.sum(lanes, axis=1)[None, :]  # [1, BLOCK_N]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + rk
            x = tl.load(
                x_rows + kk[None, :], mask=m_mask[:, None] & (kk < k_end)[None, :], other=0.0
            )  # [BLOCK_M, BLOCK_K]
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
            kk_next = kk + BLOCK_K
            w = tl.load(w_rows + kk_next[None, :], mask=n_mask[:, None] & (kk_next < k_end)[None, :], other=0.0)
    return acc


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K], last dim contiguous
    w_ptr,  # [N, K] ([2N, K], gate then up, with SILU_MUL), last dim contiguous
    bias_ptr,  # [N] or unused
    out_ptr,  # [M, N] contiguous
    partial_ptr,  # [SPLIT_K, M, N] fp32, used when SPLIT_K > 1
    counter_ptr,  # [>= N tiles] int32 zeros, used when SPLIT_K > 1
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    k_per_split,  # a multiple of BLOCK_K
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    SILU_MUL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rm = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    n_mask = rn < N
    m_mask = rm < M
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]: W can exceed 2**31 elements (LM head)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = _rows_times_x(
        w_rows, x_rows, n_mask, m_mask, k_begin, k_end, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_PDL
    )
    if SILU_MUL:  # out = silu(x W[:N]^T) * (x W[N:]^T), rounded like qwen3.kernels.silu_and_mul (SPLIT_K is 1)
        up = _rows_times_x(
            w_rows + N * stride_wn,
            x_rows,
            n_mask,
            m_mask,
            k_begin,
            k_end,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            DOT_PRECISION,
            False,
        )
        dtype = out_ptr.dtype.element_ty
        gate = acc.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        acc = act * up.to(dtype).to(tl.float32)
    out_offsets = rm[:, None] * N + rn[None, :]  # [BLOCK_M, BLOCK_N]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(partial_ptr + pid_k * M * N + out_offsets, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so (release below)
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last split of this tile: sum all partials in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                # .cg: read from L2, where the other SMs' partials are, never a stale L1 line
                total += tl.load(partial_ptr + s * M * N + out_offsets, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + out_offsets, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0)  # ready for the next launch (and the next graph replay)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter (CPU tests): an H200's count, so the tests choose the GPU's configs
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


_counters: dict[torch.device, torch.Tensor] = {}


def _counter_buffer(device: torch.device) -> torch.Tensor | None:
    """The device's zeroed split-K counters, or None during graph capture before they exist."""
    buf = _counters.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _counters[device] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return buf


def default_config(m: int, n: int, k: int, sm_count: int = 132) -> GemvConfig:
    """Tile sizes for an [m, k] x [n, k]^T product, m <= GEMV_MAX_M, chosen from bytes, not yet tuned on a GPU.

    Aim: at least ~2 programs per SM, each streaming >= 16 KB of W per loop step with 16-byte loads.
    M = 1: [8, 512] bf16 W tiles (8 KB a step, 32 elements a thread at 4 warps); M > 1: tl.dot on
    [32, 128] tiles. Split K when the N tiles alone give fewer programs than 2 x SMs (N = hidden layers).
    ``bench/gemv.py --sweep`` times the alternatives on the GPU at hand.
    """
    if m == 1:
        cfg = GemvConfig(block_m=1, block_n=8, block_k=min(512, triton.next_power_of_2(k)), num_warps=4)
    else:
        cfg = GemvConfig(block_m=16, block_n=32, block_k=min(128, max(16, triton.next_power_of_2(k))), num_warps=4)
    tiles = triton.cdiv(n, cfg.block_n)
    k_steps = triton.cdiv(k, cfg.block_k)
    split = 1
    if tiles < 2 * sm_count and tiles <= MAX_SPLIT_TILES:
        split = min(triton.cdiv(2 * sm_count, tiles), k_steps // 2, 8)  # >= 2 loop steps per split
    return GemvConfig(cfg.block_m, cfg.block_n, cfg.block_k, max(1, split), cfg.num_warps, cfg.num_stages)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    silu_and_mul: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [M, K] with 1 <= M <= GEMV_MAX_M -> new contiguous [M, N].

    weight [N, K] and x need contiguous last dimensions and one dtype (bias [N] too). ``config``: tile sizes
    (default: ``default_config``). ``silu_and_mul``: weight is a merged [2 * d, K] gate/up projection and the
    result is ``silu(gate) * up`` [M, d] (``qwen3.kernels.silu_and_mul`` of the product) in the same launch;
    no bias, no split-K. Graph-safe: no host reads; the split-K counters are made before capture.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= GEMV_MAX_M:
        raise ValueError(f"x has {m} rows; the GEMV serves 1..{GEMV_MAX_M}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must be contiguous in their last dimension")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight is {weight.dtype} on {weight.device}, x is {x.dtype} on {x.device}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or bias.stride(0) != 1):
        raise ValueError(f"bias must be contiguous [{n}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if silu_and_mul:
        if n % 2 or bias is not None:
            raise ValueError(
                f"silu_and_mul needs a [2 * d, K] weight and no bias, got {n} rows, bias {bias is not None}"
            )
        n //= 2
    cfg = config or default_config(m, n, k, _sm_count(x.device))
    cfg.check(m, k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    split = 1 if silu_and_mul else cfg.split_k
    counters = _counter_buffer(x.device) if split > 1 else None
    tiles = triton.cdiv(n, cfg.block_n)
    if counters is None or tiles > MAX_SPLIT_TILES:
        split = 1
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # no empty split (each one must arrive at the counter)
    use_pdl = x.is_cuda and pdl_enabled() and torch.cuda.get_device_capability(x.device)[0] >= 9
    partial = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    _gemv_kernel[(tiles, split)](
        x,
        weight,
        bias if bias is not None else out,
        out,
        partial,
        counters if counters is not None else out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        k_per_split,
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=split,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        USE_PDL=use_pdl,
        SILU_MUL=silu_and_mul,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        launch_pdl=use_pdl,
    )
    return out
