"""The decode-path kernels on CUDA, bf16 (run on the lent H200; skipped with the reason on CPU machines).

- the fused q/k-norm + RoPE + KV-store kernel inside a CUDA graph, replayed with new inputs, gives the
  unfused kernels' results (padding rows write no cache slot).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fused_store_in_cuda_graph_skips_padding_rows() -> None:
    from qwen3.attention.torch_backend import store_kv
    from qwen3.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_store_kv
    from qwen3.layers.rotary import RotaryEmbedding

    t, hq, hkv, d, block_size, num_blocks = 8, 16, 8, 128, 16, 4
    rotary = RotaryEmbedding(d, 4096, 1_000_000.0).cuda()
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda").bfloat16()
    q, k, v = (part.view(t, -1, d) for part in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    qw, kw = torch.rand(d, device="cuda").bfloat16() + 0.5, torch.rand(d, device="cuda").bfloat16() + 0.5
    positions = torch.arange(t, device="cuda") * 97
    slots = torch.full((t,), -1, dtype=torch.int64, device="cuda")
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), device="cuda").bfloat16()
    v_cache = k_cache.clone()
    graph = torch.cuda.CUDAGraph()
    qk_norm_rope_store_kv(q, k, v, qw, kw, 1e-6, rotary.cos_sin, positions, k_cache, v_cache, slots)  # warm-up
    with torch.cuda.graph(graph):
        q_out = qk_norm_rope_store_kv(q, k, v, qw, kw, 1e-6, rotary.cos_sin, positions, k_cache, v_cache, slots)
    for live in (3, 8):  # rows >= live are padding (slot -1)
        new_slots = torch.randperm(num_blocks * block_size, device="cuda")[:t]
        new_slots[live:] = -1
        slots.copy_(new_slots)
        qkv.copy_(torch.randn_like(qkv))
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
        graph.replay()
        q_ref, k_ref = qk_norm_rope(q, k, qw, kw, 1e-6, rotary.cos_sin, positions)
        k_want, v_want = k_cache.clone().fill_(float("nan")), v_cache.clone().fill_(float("nan"))
        store_kv(k_ref, v, k_want, v_want, new_slots)
        assert torch.equal(q_out, q_ref)
        assert torch.equal(k_cache.nan_to_num(7.0), k_want.nan_to_num(7.0))
        assert torch.equal(v_cache.nan_to_num(7.0), v_want.nan_to_num(7.0))
