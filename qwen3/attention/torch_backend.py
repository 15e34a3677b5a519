"""Pure-PyTorch attention over the paged KV cache: the reference every other backend is tested against.

Runs anywhere (CPU tests, CI, any GPU); it loops over sequences, so it is for correctness, not speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen3.attention.backend import AttentionBackend
from qwen3.forward_batch import ForwardBatch


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k/v [T, Hkv, D] into the caches at ``slot_mapping`` [T]; slots < 0 are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_blocks, block_size, hkv, d = k_cache.shape
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: [length, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]


def paged_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached context, computed in fp32."""
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[2]
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(batch.query_lens_cpu, batch.seq_lens_cpu)):
        qi = q[start : start + q_len].float().transpose(0, 1)  # [Hq, q_len, D]
        ki = gather_context(k_cache, batch.block_tables[i], seq_len).float().repeat_interleave(group, dim=1)
        vi = gather_context(v_cache, batch.block_tables[i], seq_len).float().repeat_interleave(group, dim=1)
        # query j sits at absolute position seq_len - q_len + j and sees keys 0..that position
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos  # [q_len, seq_len]
        oi = F.scaled_dot_product_attention(qi, ki.transpose(0, 1), vi.transpose(0, 1), attn_mask=mask, scale=scale)
        out[start : start + q_len] = oi.transpose(0, 1).to(q.dtype)
        start += q_len
    return out


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    store_kv = staticmethod(store_kv)

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float
    ) -> torch.Tensor:
        return paged_attention_reference(q, k_cache, v_cache, batch, scale)
