"""The inner step both paged attention kernels share: one tile of keys through the online softmax.

Decode (``decode_attention.py``) and prefill (``prefill_attention.py``) differ in how they lay queries out
over a program (a KV head's query group vs. token x head rows) and in their masks; the step below, which
looks the tile's tokens up in the block table, loads K and V, and folds the tile into the running max, sum
and accumulator, is the same and lives here once. Scores are base 2 (``scale_log2 = scale * log2(e)``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_kv_tile(
    q,  # [ROWS, BLOCK_D] the program's queries (rows past the real ones are zero)
    m_i,  # [ROWS] fp32 running max of the base-2 scores
    l_i,  # [ROWS] fp32 running sum of 2^(s - m_i)
    acc,  # [ROWS, BLOCK_D] fp32 running sum of 2^(s - m_i) * v
    k_cache_ptr,
    v_cache_ptr,  # [num_blocks, PAGE_SIZE, Hkv, D]
    table,  # this sequence's row of the block tables (int32 pointer)
    head_offset,  # KV head * the cache's head stride
    tok,  # [BLOCK_N] context positions of this tile
    tok_mask,  # [BLOCK_N] which of them exist (read only when MASKED)
    visible,  # [ROWS or 1, BLOCK_N] which keys each row may see (read only when MASKED)
    d,  # [BLOCK_D] arange over the head dim
    d_mask,  # [BLOCK_D] d < HEAD_DIM
    scale_log2,
    stride_cache_block,
    stride_cache_slot,
    PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr,  # False: every token of the tile exists and is visible to every row (no masks)
):
    """Returns the updated ``(m_i, l_i, acc)``. With MASKED, at least one row must have seen a key before
    (or see one in this tile), so that ``m_new`` is finite wherever a row's sum is not zero."""
    # A tile may span several pages (PAGE_SIZE < BLOCK_N): look up each token's page.
    if MASKED:
        page = tl.load(table + tok // PAGE_SIZE, mask=tok_mask, other=0).to(tl.int64)
        kv_mask = tok_mask[:, None] & d_mask[None, :]
    else:
        page = tl.load(table + tok // PAGE_SIZE).to(tl.int64)
        kv_mask = d_mask[None, :]
    row = page * stride_cache_block + (tok % PAGE_SIZE) * stride_cache_slot + head_offset  # [BLOCK_N]
    # Masked loads: slots past the sequence may hold anything (even NaN), and 0 * NaN is NaN.
    k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    s = tl.dot(q, tl.trans(k)) * scale_log2  # [ROWS, BLOCK_N]
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc
