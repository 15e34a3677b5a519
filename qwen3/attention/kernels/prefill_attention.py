"""Paged prefill / extend attention: varlen new tokens over a cached prefix plus themselves, causally.

Sequence ``b`` adds ``q_len`` new tokens (rows ``query_start_loc[b] .. query_start_loc[b+1]`` of q)
whose K/V are already stored; they are the LAST ``q_len`` positions of its ``seq_len`` context, so new
token ``j`` sits at position ``seq_len - q_len + j`` and sees keys ``0 ..`` that position. This covers a
fresh prompt (no prefix), a prefix-cache hit and a chunk of a chunked prefill alike.

Work split: program (tile, b, kvh) takes BLOCK_M rows of (new token, query head of the group) pairs of
sequence ``b`` and KV head ``kvh``; row ``r`` is token ``r // G``, head ``kvh * G + r % G``. Packing the
``G = Hq / Hkv`` query heads that share a KV head into one tile reads each K/V tile once per group. Keys
below the tile's first query position need no causal mask and run in a mask-free loop; the rest run with
the causal mask. fp32 online softmax in base 2.

Reference: ``qwen3.attention.torch_backend.paged_attention_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3.attention.kernels.common import check_attention_inputs, check_index, launch_strides, output_like
from qwen3.attention.kernels.kv_tile import attend_kv_tile

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,
    v_cache_ptr,  # [num_blocks, PAGE_SIZE, Hkv, D]
    out_ptr,  # [T, Hq, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    query_start_loc_ptr,  # [B + 1] int32
    scale_log2,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,  # the model's and the cache's shapes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # the tile: rows, keys, head dim
):  # fmt: skip
    tile = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    r0 = tile * BLOCK_M
    if r0 >= q_len * GROUP:  # the grid is sized for the longest sequence; shorter ones have fewer tiles
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len  # cached tokens before the first new one

    r = r0 + tl.arange(0, BLOCK_M)
    row_mask = r < q_len * GROUP
    j = r // GROUP  # new-token index within the sequence
    qh = kvh * GROUP + r % GROUP  # query head
    q_pos = prefix + j  # absolute position of each row's token
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    tok_row = (q_start + j).to(tl.int64)
    q = tl.load(
        q_ptr + tok_row[:, None] * stride_qt + qh[:, None] * stride_qh + d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    head_offset = kvh * stride_cache_head

    # Keys [0, prefix + first row's token] are visible to every row of the tile: no mask, in whole tiles.
    j_first = r0 // GROUP
    j_last = tl.minimum((r0 + BLOCK_M - 1) // GROUP, q_len - 1)
    unmasked_end = ((prefix + j_first + 1) // BLOCK_N) * BLOCK_N
    kv_end = prefix + j_last + 1  # no row of the tile sees a key at or past this position (<= seq_len)
    for n0 in range(0, unmasked_end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)  # all < unmasked_end <= seq_len: real, stored tokens
        # MASKED=False: the two mask arguments are not read (tok stands in for them).
        m_i, l_i, acc = attend_kv_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, head_offset, tok, tok, tok,
            d, d_mask, scale_log2, stride_cache_block, stride_cache_slot, PAGE_SIZE=PAGE_SIZE, MASKED=False,
        )  # fmt: skip

    # The diagonal band: causal mask per row. Key 0 is in the first tile processed (of either loop)
    # and every row sees it, so m_i is finite before any fully masked row-tile pair can occur.
    for n0 in range(unmasked_end, kv_end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        tok_mask = tok < kv_end
        visible = (tok[None, :] <= q_pos[:, None]) & tok_mask[None, :]  # [BLOCK_M, BLOCK_N]
        m_i, l_i, acc = attend_kv_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, head_offset, tok, tok_mask, visible,
            d, d_mask, scale_log2, stride_cache_block, stride_cache_slot, PAGE_SIZE=PAGE_SIZE, MASKED=True,
        )  # fmt: skip

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + tok_row[:, None] * stride_ot + qh[:, None] * stride_oh + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


def _default_tiles(head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head size."""
    if device.type != "cuda":
        return 32, 16, 4, 1  # the Triton interpreter: small tiles keep numpy fast
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 2


def paged_prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]: the new tokens of every sequence, sequence after sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new tokens
    query_start_loc: torch.Tensor,  # [B + 1] int32, cu_seqlens of the new tokens
    max_query_len: int,  # host bound on the new tokens of any sequence (sizes the grid)
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each sequence's new tokens over its context (their K/V already stored).

    ``max_query_len`` must be >= every sequence's new-token count (rows beyond it would be left
    unwritten); it is a host int because the grid depends on it, which is why decode steps use
    ``paged_decode_attention`` inside CUDA graphs instead. ``out`` [T, Hq, D] (contiguous last dim)
    receives the result if given; the tile sizes and launch options are exposed for tests and benchmarks.
    """
    block_size, num_kv_heads, head_dim, group = check_attention_inputs(q, k_cache, v_cache)
    num_tokens = q.shape[0]
    check_index("seq_lens", seq_lens, torch.int32, (None,), k_cache.device)
    batch_size = seq_lens.shape[0]
    check_index("block_tables", block_tables, torch.int32, (batch_size, None), k_cache.device)
    check_index("query_start_loc", query_start_loc, torch.int32, (batch_size + 1,), k_cache.device)
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    default_m, default_n, default_warps, default_stages = _default_tiles(head_dim, q.device)
    block_m, block_n = block_m or default_m, block_n or default_n
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")

    out = output_like(q, out)  # [T, Hq, D]
    if num_tokens == 0 or batch_size == 0:
        return out
    grid = (triton.cdiv(max_query_len * group, block_m), batch_size, num_kv_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        scale * LOG2E,
        *launch_strides(q, out, k_cache, block_tables),
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=num_warps or default_warps,
        num_stages=num_stages or default_stages,
    )
    return out
