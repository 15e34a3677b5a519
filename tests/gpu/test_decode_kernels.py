"""The decode-path kernels on CUDA, bf16 (run on the lent H200; skipped with the reason on CPU machines).

- the small-M GEMV matches F.linear (float64 reference, one bf16 unit relative) at the real decode shapes of
  Qwen3-0.6B and 8B (M = 1, 2, 4, 8), and cuBLAS itself is held to the same bound, so the test measures the
  kernel, not the bound;
- the GEMV and the fused q/k-norm + RoPE + KV-store kernel inside a CUDA graph, replayed with new inputs,
  give the eager results (split-K counters reset; padding rows write no cache slot);
- the gate/up GEMV with SiLU-and-multiply in its epilogue matches cuBLAS + the SiLU kernel (float64 reference);
- a bf16 model on CUDA with the switches on gives the logits of the same model with both off (the
  attention backend's store kernel and cuBLAS), prefill and decode;
- the GEMV launched with programmatic dependent launch (QWEN3_PDL=1) reads its predecessor's output correctly,
  eager and in a graph;
- a timing print per shape: GEMV vs torch.matmul (bench/gemv.py is the full benchmark).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BF16_EPS = torch.finfo(torch.bfloat16).eps
# (name, N, K): Qwen3-0.6B (hidden 1024, 16 q / 8 kv heads of 128, intermediate 3072) and 8B (hidden 4096,
# 32 / 8 heads, intermediate 12288); gate_up is the merged [2 * intermediate, hidden]
SHAPES = [
    ("0.6B qkv", 4096, 1024),
    ("0.6B o", 1024, 2048),
    ("0.6B gate_up", 6144, 1024),
    ("0.6B down", 1024, 3072),
    ("0.6B lm_head", 151936, 1024),
    ("8B qkv", 6144, 4096),
    ("8B o", 4096, 4096),
    ("8B gate_up", 24576, 4096),
    ("8B down", 4096, 12288),
]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize(("name", "n", "k"), SHAPES)
def test_gemv_matches_linear(name: str, n: int, k: int, m: int) -> None:
    from qwen3.kernels.gemv import default_config, gemv

    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).bfloat16()
    bias = torch.randn(n, device="cuda", generator=gen).bfloat16() if m == 2 else None
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    out = gemv(x, w, bias)
    cublas = F.linear(x, w, bias)
    cfg = default_config(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
    print(f"{name} m{m} {cfg}: gemv rel {_rel(out, ref):.2e}, cublas rel {_rel(cublas, ref):.2e}")
    assert _rel(cublas, ref) <= BF16_EPS
    assert _rel(out, ref) <= BF16_EPS


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize(("d", "k"), [(3072, 1024), (12288, 4096)])  # 0.6B and 8B gate/up
def test_gemv_silu_and_mul_matches_unfused(d: int, k: int, m: int) -> None:
    from qwen3.kernels.gemv import gemv
    from qwen3.kernels.silu_and_mul import silu_and_mul

    x = torch.randn(m, k, device="cuda").bfloat16()
    w = (torch.randn(2 * d, k, device="cuda") * k**-0.5).bfloat16()
    unfused = silu_and_mul(F.linear(x, w)).double()  # cuBLAS, then the SiLU kernel
    gate, up = F.linear(x.double(), w.double()).chunk(2, dim=-1)
    exact = F.silu(gate) * up
    fused = gemv(x, w, silu_and_mul=True)
    print(f"silu gemv d{d} k{k} m{m}: fused rel {_rel(fused, exact):.2e}, unfused rel {_rel(unfused, exact):.2e}")
    assert _rel(unfused, exact) <= BF16_EPS
    assert _rel(fused, exact) <= BF16_EPS


def test_gemv_timing_print() -> None:
    """Not an assertion: the numbers the lead reads (bench/gemv.py has the sweep and the copy ceiling)."""
    import triton.testing

    from qwen3.kernels.gemv import gemv

    for name, n, k in SHAPES:
        x = torch.randn(1, k, device="cuda").bfloat16()
        w = torch.randn(n, k, device="cuda").bfloat16()
        t_gemv = triton.testing.do_bench(lambda: gemv(x, w), warmup=10, rep=50, return_mode="median")
        t_mm = triton.testing.do_bench(lambda: torch.matmul(x, w.t()), warmup=10, rep=50, return_mode="median")
        tbps = n * k * 2 / t_gemv / 1e9
        print(f"{name} M=1: gemv {t_gemv * 1e3:.1f} us ({tbps:.2f} TB/s), torch.matmul {t_mm * 1e3:.1f} us")


def test_gemv_in_cuda_graph_replays_split_k() -> None:
    from qwen3.kernels.gemv import default_config, gemv

    m, n, k = 1, 1024, 3072  # 0.6B down_proj: split K by default
    assert default_config(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count).split_k > 1
    x = torch.randn(m, k, device="cuda").bfloat16()
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    eager = gemv(x, w)  # also makes the counters, outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = gemv(x, w)
    for _ in range(3):
        x.copy_(torch.randn(m, k, device="cuda").bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, gemv(x, w))
        assert _rel(static_out, F.linear(x.double(), w.double())) <= BF16_EPS
    assert eager.shape == (m, n)


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


@torch.inference_mode()
def test_model_bf16_switches_on_match_off(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import load_model

    from qwen3.forward_batch import ForwardBatch

    model = load_model(tiny_checkpoint)
    rotary = model.model.layers[0].self_attn.rotary_emb  # one table shared by every layer
    cos_sin = rotary.cos_sin.clone()
    model.to(device="cuda", dtype=torch.bfloat16)
    rotary.cos_sin = cos_sin.cuda()  # float32, as the engine builds it (the fused kernels need it)
    for attn in model.attention_layers():
        attn.k_cache = attn.k_cache.to(device="cuda", dtype=torch.bfloat16)
        attn.v_cache = attn.v_cache.to(device="cuda", dtype=torch.bfloat16)
    prompts = [[(5 * i + 11 * j) % 500 for j in range(n)] for i, n in enumerate([5, 17, 3])]
    tables = [[0, 1], [2, 3], [4]]
    block_size = model.attention_layers()[0].k_cache.shape[1]

    def run() -> list[torch.Tensor]:
        outs = []
        batch = ForwardBatch.build(prompts, [0, 0, 0], tables, block_size, "cuda")  # prefill, all rows
        batch.logits_indices = torch.arange(batch.num_tokens, device="cuda")
        outs.append(model.compute_logits(model(batch), batch).float())
        lens = [len(p) for p in prompts]
        for step in range(3):  # decode: M = 3 rows, the GEMV's range
            batch = ForwardBatch.build([[7 + step]] * 3, lens, tables, block_size, "cuda")
            outs.append(model.compute_logits(model(batch), batch).float())
            lens = [n + 1 for n in lens]
        return outs

    fused = run()
    monkeypatch.setattr("qwen3.model.fused_kv_store_enabled", lambda: False)
    monkeypatch.setattr("qwen3.layers.linear.use_gemv", lambda x, w: False)
    monkeypatch.setattr("qwen3.model.use_gemv", lambda x, w: False)  # the MLP's gate/up GEMV with SiLU
    plain = run()
    for i, (a, b) in enumerate(zip(fused, plain)):
        assert torch.isfinite(a).all(), f"step {i}: non-finite logits"
        rel = float((a - b).norm() / b.norm())
        print(f"step {i}: fused vs plain logits, relative {rel:.2e}")
        assert rel <= 2e-2, f"step {i}: relative difference {rel:.2e}"


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs Hopper or later"
)
def test_gemv_with_programmatic_dependent_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """QWEN3_PDL=1: each GEMV reads x that the kernel just before it wrote, eager and in a replayed graph."""
    from qwen3.kernels import gemv as gemv_module
    from qwen3.kernels.rms_norm import rms_norm

    monkeypatch.setattr(gemv_module, "pdl_enabled", lambda: True)
    hidden, inter = 1024, 3072
    h = torch.randn(1, hidden, device="cuda").bfloat16()
    norm_w = torch.rand(hidden, device="cuda").bfloat16() + 0.5
    w_up = (torch.randn(inter, hidden, device="cuda") * hidden**-0.5).bfloat16()
    w_down = (torch.randn(hidden, inter, device="cuda") * inter**-0.5).bfloat16()  # split K by default

    def chain() -> torch.Tensor:
        x = rms_norm(h, norm_w, 1e-6)  # [1, hidden], written by the kernel before the first GEMV
        up = gemv_module.gemv(x, w_up)  # [1, inter]
        return gemv_module.gemv(up, w_down)  # [1, hidden], reads what the previous GEMV wrote

    def reference() -> torch.Tensor:
        x = rms_norm(h, norm_w, 1e-6).double()
        return (x @ w_up.double().t()).bfloat16().double() @ w_down.double().t()

    assert _rel(chain(), reference()) <= BF16_EPS
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        h.copy_(torch.randn_like(h))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(out, reference()) <= BF16_EPS
