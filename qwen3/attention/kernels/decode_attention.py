"""Paged decode attention: one new query token per sequence, split-K over the context ("flash-decoding").

Work split: program (b, kvh, s) takes sequence ``b``, KV head ``kvh`` with ALL of that head's
``G = Hq / Hkv`` query heads (so each K/V tile is read from memory once per group, not once per query
head), and the ``s``-th of ``num_splits`` equal runs of the sequence's context. Each program runs an
online softmax over its run and writes a partial output normalised by its own sum, plus the log-sum-exp
(base 2) of its scores; a second kernel combines the splits of each (b, query head):

    out = sum_s 2^(lse_s - m) * o_s / sum_s 2^(lse_s - m),   m = max_s lse_s.

With one split the first kernel writes the final output itself and the combine is skipped.

CUDA graphs: the grid and the partial buffers depend only on tensor shapes (batch, heads, and the
block-table width), never on the lengths in ``seq_lens``; a split whose run starts beyond its
sequence's length writes an empty partial (lse = -inf, o = 0) that the combine weighs by zero.
Reference: ``qwen3.attention.torch_backend.paged_attention_reference`` with one query per sequence.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from qwen3.attention.kernels.common import check_attention_inputs, check_index, launch_strides, output_like
from qwen3.attention.kernels.kv_tile import attend_kv_tile

LOG2E = 1.4426950408889634
#: splits are never shorter than this many tokens (one default key tile): the cap only binds when the
#: block table is narrow, i.e. a small max_model_len. It was 256, which at batch 1 with a 656-token
#: table gave 2 splits x 8 KV heads = 16 programs for 132 SMs, each walking ~5 tiles one after another:
#: 11.7 us a layer, 23% of the H200's batch-1 step (torch profiler, 2026-12-03).
MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,
    v_cache_ptr,  # [num_blocks, PAGE_SIZE, Hkv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D]           (written when DIRECT_OUT)
    part_o_ptr,
    part_lse_ptr,  # [B, Hq, S, D], [B, Hq, S] fp32 (written otherwise)
    scale_log2,  # softmax scale * log2(e): scores are kept in base 2
    num_splits,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    stride_po_b,
    stride_po_h,
    stride_po_s,
    stride_pl_b,
    stride_pl_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,  # the model's and the cache's shapes
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # the tile: query heads, keys, head dim
    DIRECT_OUT: tl.constexpr,  # one split: write the output itself, no partials
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)

    # Every split gets the same whole number of BLOCK_N tiles of this sequence's context.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP  # BLOCK_G >= 16 for tl.dot; rows past the group are zero queries
    d_mask = d < HEAD_DIM
    qh = kvh * GROUP + g  # the query heads that share this KV head
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + qh[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max (base-2 scores)
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running sum of 2^(s - m_i) * v
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    head_offset = kvh * stride_cache_head
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)  # context positions of this tile
        tok_mask = tok < end
        # The tile holds at least one valid token, so m_i is finite from the first tile on.
        m_i, l_i, acc = attend_kv_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, head_offset, tok, tok_mask, tok_mask[None, :],
            d, d_mask, scale_log2, stride_cache_block, stride_cache_slot, PAGE_SIZE=PAGE_SIZE, MASKED=True,
        )  # fmt: skip

    # An empty split (start >= seq_len) has l_i = 0: write o = 0 and lse = -inf, never 0/0.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT_OUT:
        tl.store(
            out_ptr + b.to(tl.int64) * stride_ob + qh[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        base = b.to(tl.int64) * stride_po_b + qh * stride_po_h + split * stride_po_s  # [BLOCK_G]
        tl.store(part_o_ptr + base[:, None] + d[None, :], o, mask=out_mask)
        lse = m_i + tl.log2(l_i)  # -inf for an empty split
        tl.store(part_lse_ptr + b.to(tl.int64) * stride_pl_b + qh * stride_pl_h + split, lse, mask=g_mask)


@triton.jit
def _decode_combine_kernel(
    part_o_ptr,
    part_lse_ptr,  # [B, Hq, S, D], [B, Hq, S] fp32
    out_ptr,  # [B, Hq, D]
    num_splits,
    stride_po_b,
    stride_po_h,
    stride_po_s,
    stride_pl_b,
    stride_pl_h,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    d_mask = d < HEAD_DIM
    lse = tl.load(part_lse_ptr + b * stride_pl_b + h * stride_pl_h + s, mask=s_mask, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # only if every split is empty (seq_len 0): weights become 0
    w = tl.exp2(lse - m)  # 0 for empty splits
    o = tl.load(
        part_o_ptr + b * stride_po_b + h * stride_po_h + s[:, None] * stride_po_s + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    num = tl.sum(o * w[:, None], 0)  # [BLOCK_D]
    den = tl.sum(w, 0)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the Triton interpreter (CPU tensors): a small stand-in so tests still split
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch_size: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """A power-of-two split count from shapes only (so a captured graph keeps it valid on replay).

    Enough (sequence, KV head, split) programs to give every SM about four, but no split shorter
    than MIN_TOKENS_PER_SPLIT tokens of the longest possible context (``max_context``, the block-table
    width times the block size).
    """
    want = math.ceil(4 * _num_sms(device) / max(1, batch_size * num_kv_heads))
    cap = max(1, min(MAX_SPLITS, max_context // MIN_TOKENS_PER_SPLIT))
    splits = min(triton.next_power_of_2(want), triton.next_power_of_2(cap))
    while splits > cap:
        splits //= 2
    return max(1, int(splits))


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]: the one new query of each sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new token (>= 1)
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of each sequence's newest token over its whole cached context (new K/V already stored).

    Never reads the device from the host, and the launch depends only on shapes, so it can be
    captured in a CUDA graph. ``num_splits`` (default: ``choose_num_splits``), ``block_n`` (keys per
    tile), ``num_warps`` and ``num_stages`` are exposed for tests and benchmarks. ``out`` [B, Hq, D]
    (contiguous last dim) receives the result if given, else a new tensor does.
    """
    block_size, num_kv_heads, head_dim, group = check_attention_inputs(q, k_cache, v_cache)
    batch_size, num_heads, _ = q.shape
    check_index("block_tables", block_tables, torch.int32, (batch_size, None), k_cache.device)
    check_index("seq_lens", seq_lens, torch.int32, (batch_size,), k_cache.device)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if num_splits is None:
        num_splits = choose_num_splits(batch_size, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    out = output_like(q, out)  # [B, Hq, D]
    if batch_size == 0:
        return out
    direct = num_splits == 1
    if direct:
        part_o = part_lse = out  # unused by the kernel; any tensor will do
        po_strides: tuple[int, ...] = (0, 0, 0)
        pl_strides: tuple[int, ...] = (0, 0)
    else:
        part_o = torch.empty(batch_size, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch_size, num_heads, num_splits, dtype=torch.float32, device=q.device)
        po_strides, pl_strides = part_o.stride()[:3], part_lse.stride()[:2]
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(batch_size, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_o,
        part_lse,
        scale * LOG2E,
        num_splits,
        *launch_strides(q, out, k_cache, block_tables),
        *po_strides,
        *pl_strides,
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DIRECT_OUT=direct,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not direct:
        _decode_combine_kernel[(batch_size, num_heads)](
            part_o,
            part_lse,
            out,
            num_splits,
            *po_strides,
            *pl_strides,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out
