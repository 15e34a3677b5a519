"""Random paged-attention inputs shared by the attention kernel tests (GPU and Triton interpreter).

A case is a batch of sequences, each with ``context_lens[i]`` tokens already cached and
``query_lens[i]`` new ones, over a KV pool whose blocks are handed out in random order (block tables
are non-contiguous and unsorted). q/k/v are views into one fused qkv tensor, strided the way the
model's ``qkv_proj(...).split(...)`` makes them. Slots no sequence uses hold ``unused_fill``
(NaN by default), so a kernel that reads past a sequence's end produces NaN rather than a near miss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen3.attention.torch_backend import store_kv as store_kv_reference
from qwen3.forward_batch import ForwardBatch


@dataclass
class PagedCase:
    batch: ForwardBatch
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D] new keys, not yet in the cache
    v: torch.Tensor  # [T, Hkv, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D], holding every sequence's cached prefix
    v_cache: torch.Tensor
    scale: float


def make_paged_case(
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    unused_fill: float = float("nan"),
    spare_blocks: int = 3,
) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-(c + q) // block_size) for q, c in zip(query_lens, context_lens)]
    num_blocks = sum(blocks_needed) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in blocks_needed:
        tables.append(order[used : used + n])
        used += n
    batch = ForwardBatch.build([[0] * q for q in query_lens], context_lens, tables, block_size, device)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, unused_fill, dtype=dtype, device=device)
    v_cache = torch.full(shape, unused_fill, dtype=dtype, device=device)
    # The cached prefix: position p of sequence i lives in slot table[p // block_size] * block_size + p % block_size.
    prefix_slots = [
        tables[i][p // block_size] * block_size + p % block_size for i, c in enumerate(context_lens) for p in range(c)
    ]
    if prefix_slots:
        slots = torch.tensor(prefix_slots, dtype=torch.int64, device=device)
        pk = torch.randn(len(prefix_slots), num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
        pv = torch.randn(len(prefix_slots), num_kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
        store_kv_reference(pk, pv, k_cache, v_cache, slots)

    num_tokens = sum(query_lens)
    widths = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(num_tokens, sum(widths), generator=gen).to(device=device, dtype=dtype)  # [T, (Hq + 2 Hkv) D]
    q, k, v = qkv.split(widths, dim=-1)
    return PagedCase(
        batch=batch,
        q=q.view(num_tokens, num_heads, head_dim),
        k=k.view(num_tokens, num_kv_heads, head_dim),
        v=v.view(num_tokens, num_kv_heads, head_dim),
        k_cache=k_cache,
        v_cache=v_cache,
        scale=head_dim**-0.5,
    )


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp32 (NaN anywhere in ``got`` gives NaN, which fails any bound)."""
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()
