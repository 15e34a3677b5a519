"""The fused element-wise kernels (``qwen3.kernels``) against the PyTorch layer code they replace.

Shared by the GPU tests (bf16, fp16, fp32 on CUDA) and the CPU test that runs the kernels under the
Triton interpreter (fp16 and fp32: the interpreter holds bf16 as raw integers). Inputs are strided the
way the model makes them (q/k as views of one qkv projection) and include rows of large magnitude.
Returns, per case, the relative error ||out - ref|| / ||ref|| (rotary's cancellations make
element-wise error units meaningless near zero outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen3.attention.torch_backend import store_kv as store_kv_reference
from qwen3.config import RopeScaling
from qwen3.layers.layernorm import RMSNorm
from qwen3.layers.rotary import RotaryEmbedding


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], eps).to(device=x.device, dtype=x.dtype)
    norm.weight.data.copy_(weight)
    return norm._norm(x)  # the PyTorch definition, whatever the device


def run_cases(device: str, dtype: torch.dtype) -> dict[str, float]:
    """{case name: relative error} for every fused kernel on ``device`` in ``dtype``."""
    from qwen3.kernels.gemv import GemvConfig, default_config, gemv
    from qwen3.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_store_kv
    from qwen3.kernels.rms_norm import rms_norm
    from qwen3.kernels.silu_and_mul import silu_and_mul

    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    results: dict[str, float] = {}
    eps = 1e-6
    for rows, hidden in [(1, 1024), (7, 1024), (33, 2560), (5, 96)]:
        x, residual = randn(rows, hidden, scale=3.0), randn(rows, hidden, scale=20.0)
        weight = randn(hidden) + 1
        out = rms_norm(x, weight, eps)
        results[f"rms_norm {rows}x{hidden}"] = _rel(out, _norm_reference(x, weight, eps))
        out, summed = rms_norm(x, weight, eps, residual)
        ref_sum = x + residual
        ref = _norm_reference(ref_sum, weight, eps)
        results[f"add_rms_norm {rows}x{hidden}"] = max(_rel(out, ref), _rel(summed, ref_sum))

    for tokens, d in [(1, 3072), (9, 3072), (4, 100)]:
        x = randn(tokens, 2 * d, scale=4.0)
        gate, up = x.chunk(2, dim=-1)
        ref = F.silu(gate) * up
        out = silu_and_mul(x)
        results[f"silu_and_mul {tokens}x{d}"] = _rel(out, ref)

    yarn = RopeScaling(factor=4.0, original_max_position_embeddings=512)
    for hq, hkv, d, scaling in [(16, 8, 128, None), (8, 1, 64, None), (4, 4, 128, yarn), (14, 2, 64, None)]:
        tokens, max_pos = 11, 2048
        rotary = RotaryEmbedding(d, max_pos, 1_000_000.0, scaling).to(device)
        qkv = randn(tokens, (hq + 2 * hkv) * d, scale=2.0)
        q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k = q.view(tokens, hq, d), k.view(tokens, hkv, d)
        qw, kw = randn(d) + 1, randn(d) + 1
        positions = torch.tensor([0, 1, 2, 511, 512, 513, 1000, 2047, 7, 7, 300], device=device)
        q_ref, k_ref = rotary(positions, _norm_reference(q, qw, eps), _norm_reference(k, kw, eps))
        q_out, k_out = qk_norm_rope(q, k, qw, kw, eps, rotary.cos_sin, positions)
        name = f"qk_norm_rope hq{hq} hkv{hkv} d{d}{' yarn' if scaling else ''}"
        results[name] = max(_rel(q_out, q_ref), _rel(k_out, k_ref))

    # q/k-norm + RoPE + KV store in one launch, against the same reference followed by the torch store.
    # Caches start at a sentinel, so a write at a padding row's slot (-1) or at a wrong slot shows in the error.
    for hq, hkv, d, block_size, scaling in [(16, 8, 128, 16, None), (8, 1, 64, 256, yarn), (14, 2, 64, 16, None)]:
        tokens, max_pos, num_blocks = 11, 2048, 5
        rotary = RotaryEmbedding(d, max_pos, 1_000_000.0, scaling).to(device)
        qkv = randn(tokens, (hq + 2 * hkv) * d, scale=2.0)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)
        qw, kw = randn(d) + 1, randn(d) + 1
        positions = torch.tensor([0, 1, 2, 511, 512, 513, 1000, 2047, 7, 7, 300], device=device)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
        slots[[3, 9]] = -1  # padding rows of a CUDA-graph batch
        slots = slots.to(device)
        k_cache = torch.full((num_blocks, block_size, hkv, d), 7.0, dtype=dtype, device=device)
        v_cache, k_ref_cache, v_ref_cache = k_cache.clone(), k_cache.clone(), k_cache.clone()
        q_ref, k_ref = rotary(positions, _norm_reference(q, qw, eps), _norm_reference(k, kw, eps))
        store_kv_reference(k_ref, v, k_ref_cache, v_ref_cache, slots)
        q_out = qk_norm_rope_store_kv(q, k, v, qw, kw, eps, rotary.cos_sin, positions, k_cache, v_cache, slots)
        name = f"qk_norm_rope_store_kv hq{hq} hkv{hkv} d{d} block{block_size}{' yarn' if scaling else ''}"
        results[name] = max(_rel(q_out, q_ref), _rel(k_cache, k_ref_cache), _rel(v_cache, v_ref_cache))

    # small-M GEMV against F.linear in float64 (both paths accumulate in fp32, in different orders). The
    # default configs split K on the hidden-sized outputs (few N tiles); the explicit ones force each path.
    forced = {
        "split3 m1": GemvConfig(block_m=1, block_n=16, block_k=64, split_k=3),
        "dot split2": GemvConfig(block_m=16, block_n=16, block_k=32, split_k=2),
        "dot nosplit": GemvConfig(block_m=16, block_n=64, block_k=64),
    }
    for m, n, k, bias, cfg_name in [
        (1, 256, 1024, False, None),
        (1, 40, 96, True, None),
        (1, 1000, 64, False, None),
        (3, 256, 1024, True, None),
        (8, 72, 200, False, None),
        (1, 48, 320, True, "split3 m1"),
        (5, 48, 320, True, "dot split2"),
        (2, 100, 130, False, "dot nosplit"),
    ]:
        x, w = randn(m, k), randn(n, k, scale=0.05)
        b = randn(n) if bias else None
        cfg = forced[cfg_name] if cfg_name else None
        out = gemv(x, w, b, cfg)
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        split = (cfg or default_config(m, n, k)).split_k
        results[f"gemv m{m} n{n} k{k}{' bias' if bias else ''} split{split}{' ' + cfg_name if cfg_name else ''}"] = (
            _rel(out, ref)
        )
        if split > 1:  # the counters were reset: a second call (a graph replay) gives the same answer
            results[f"gemv m{m} n{n} k{k} split{split} again"] = _rel(gemv(x, w, b, cfg), out.double())
    # gate/up GEMV with SiLU-and-multiply in its epilogue, against the unfused path it replaces: the GEMV's gate/up
    # product (checked against float64 above), then SiluAndMul's PyTorch code in the dtype
    for m, d, k in [(1, 96, 256), (4, 40, 64), (8, 128, 200)]:
        x, w = randn(m, k), randn(2 * d, k, scale=0.1)
        out = gemv(x, w, silu_and_mul=True)
        gate, up = gemv(x, w).chunk(2, dim=-1)
        results[f"gemv silu_and_mul m{m} d{d} k{k}"] = _rel(out, F.silu(gate) * up)
    return results
