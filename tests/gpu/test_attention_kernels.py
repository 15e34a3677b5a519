"""Attention kernels and GPU backends against the PyTorch reference (run on the lent H100).

Every comparison uses fresh random bf16 inputs and passes when ||out - ref|| / ||ref|| <= 1e-2 with
``ref = paged_attention_reference`` (fp32 math). Outputs are poisoned with NaN before the kernel runs,
and so is the memory the CUDA caching allocator hands out next (split-K partial buffers), so a row or
split left unwritten fails. Cache slots no sequence uses hold NaN for the Triton kernels (a read past
a sequence's end fails); FlashAttention-4 is documented to need finite values there (see
``qwen3.attention.flash_attn_backend``), so its cases fill them with zeros.

Covered: context length 1, lengths on and across block boundaries, GQA ratios 1/2/4/8, head_dim 64
and 128, block sizes 16 and 256, prefix-cache hits and fresh prompts in one batch, random
non-contiguous block tables, strided q/k/v (views of one fused qkv), the store kernel with -1 slots,
and decode inside a CUDA graph replayed with changing inputs (same result as eager, padding rows
write nothing).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from attention_cases import PagedCase, make_paged_case, relative_error  # noqa: E402

from qwen3.attention.backend import backend_unavailable_reason, create_backend  # noqa: E402
from qwen3.attention.torch_backend import TorchAttentionBackend, paged_attention_reference  # noqa: E402
from qwen3.attention.torch_backend import store_kv as store_kv_reference  # noqa: E402
from qwen3.forward_batch import ForwardBatch  # noqa: E402

CUDA = torch.device("cuda")
TOL = 1e-2
GQA = [(8, 8), (16, 8), (16, 4), (32, 4)]  # (Hq, Hkv): group sizes 1, 2, 4, 8
HEAD_DIMS = [64, 128]
BLOCK_SIZES = [16, 256]


def poison_allocator() -> None:
    """Leave NaN in memory the caching allocator will reuse (both its large and small pools)."""
    junk = [torch.full((64 << 20,), float("nan"), device=CUDA)]
    junk += [torch.full((128 << 10,), float("nan"), device=CUDA) for _ in range(32)]
    del junk


def decode_contexts(block_size: int) -> list[int]:
    """Cached tokens before the new one: context length 1, on and either side of block boundaries, long."""
    return [0, block_size - 1, block_size, block_size + 1, 2 * block_size - 1, 3 * block_size + 7, 2999]


def mixed_prefill(block_size: int) -> tuple[list[int], list[int]]:
    """(new tokens, cached tokens) per sequence: fresh prompts, prefix hits, chunks, a decode row, one batch."""
    pairs = [
        (1, 0),
        (7, 0),
        (block_size, 0),
        (block_size + 1, 0),
        (5, block_size - 1),
        (3 * block_size, block_size),
        (1, 2 * block_size + 3),
        (200, 1000),
        (300, 0),
        (64, 129),
    ]
    return [q for q, _ in pairs], [c for _, c in pairs]


def store_new_kv(case: PagedCase) -> None:
    store_kv_reference(case.k, case.v, case.k_cache, case.v_cache, case.batch.slot_mapping)


def reference(case: PagedCase) -> torch.Tensor:
    return paged_attention_reference(case.q, case.k_cache, case.v_cache, case.batch, case.scale)


# ---- store ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_store_kv_matches_torch_and_skips_negative_slots(block_size: int, head_dim: int) -> None:
    from qwen3.attention.kernels.store_kv import store_kv

    case = make_paged_case(
        [5, 1, 40, 17],
        [0, 3, block_size, 2 * block_size - 1],
        16,
        8,
        head_dim,
        block_size,
        dtype=torch.bfloat16,
        device=CUDA,
        seed=block_size + head_dim,
    )
    slots = case.batch.slot_mapping.clone()
    slots[[0, 6, 20]] = -1  # padding rows
    k_want, v_want = case.k_cache.clone(), case.v_cache.clone()
    store_kv_reference(case.k, case.v, k_want, v_want, slots)
    store_kv(case.k, case.v, case.k_cache, case.v_cache, slots)
    torch.testing.assert_close(case.k_cache, k_want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(case.v_cache, v_want, rtol=0, atol=0, equal_nan=True)


# ---- decode -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
def test_decode_kernel_matches_reference(
    heads: tuple[int, int], head_dim: int, block_size: int, num_splits: int | None
) -> None:
    from qwen3.attention.kernels.decode_attention import paged_decode_attention

    contexts = decode_contexts(block_size)
    case = make_paged_case(
        [1] * len(contexts),
        contexts,
        *heads,
        head_dim,
        block_size,
        dtype=torch.bfloat16,
        device=CUDA,
        seed=sum(heads) + head_dim + block_size,
    )
    store_new_kv(case)
    ref = reference(case)
    out = torch.full_like(ref, float("nan"))
    poison_allocator()
    paged_decode_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        case.batch.block_tables,
        case.batch.seq_lens,
        case.scale,
        num_splits=num_splits,
        out=out,
    )
    assert relative_error(out, ref) <= TOL


@pytest.mark.parametrize("block_n, num_warps, num_stages", [(16, 4, 1), (32, 4, 3), (128, 8, 2)])
def test_decode_kernel_other_tilings(block_n: int, num_warps: int, num_stages: int) -> None:
    """The tile options the benchmark sweeps give the same answers."""
    from qwen3.attention.kernels.decode_attention import paged_decode_attention

    contexts = decode_contexts(16)
    case = make_paged_case([1] * len(contexts), contexts, 16, 8, 128, 16, dtype=torch.bfloat16, device=CUDA, seed=7)
    store_new_kv(case)
    ref = reference(case)
    for splits in (1, 4):
        poison_allocator()
        out = paged_decode_attention(
            case.q,
            case.k_cache,
            case.v_cache,
            case.batch.block_tables,
            case.batch.seq_lens,
            case.scale,
            num_splits=splits,
            block_n=block_n,
            num_warps=num_warps,
            num_stages=num_stages,
        )
        assert relative_error(out, ref) <= TOL, (splits, block_n)


# ---- prefill / extend -------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
def test_prefill_kernel_matches_reference(heads: tuple[int, int], head_dim: int, block_size: int) -> None:
    from qwen3.attention.kernels.prefill_attention import paged_prefill_attention

    query_lens, contexts = mixed_prefill(block_size)
    case = make_paged_case(
        query_lens,
        contexts,
        *heads,
        head_dim,
        block_size,
        dtype=torch.bfloat16,
        device=CUDA,
        seed=sum(heads) * head_dim + block_size,
    )
    store_new_kv(case)
    ref = reference(case)
    out = torch.full_like(ref, float("nan"))
    b = case.batch
    paged_prefill_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        b.block_tables,
        b.seq_lens,
        b.query_start_loc,
        b.max_query_len,
        case.scale,
        out=out,
    )
    assert relative_error(out, ref) <= TOL
    # per sequence too: one bad sequence must not hide in the batch norm
    for i, (start, end) in enumerate(zip(b.query_start_loc[:-1].tolist(), b.query_start_loc[1:].tolist())):
        assert relative_error(out[start:end], ref[start:end]) <= TOL, f"sequence {i}"


@pytest.mark.parametrize("block_m, block_n, num_warps, num_stages", [(64, 32, 4, 2), (128, 128, 8, 2), (32, 16, 4, 1)])
def test_prefill_kernel_other_tilings(block_m: int, block_n: int, num_warps: int, num_stages: int) -> None:
    from qwen3.attention.kernels.prefill_attention import paged_prefill_attention

    query_lens, contexts = mixed_prefill(16)
    case = make_paged_case(query_lens, contexts, 16, 4, 128, 16, dtype=torch.bfloat16, device=CUDA, seed=11)
    store_new_kv(case)
    ref = reference(case)
    b = case.batch
    out = paged_prefill_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        b.block_tables,
        b.seq_lens,
        b.query_start_loc,
        b.max_query_len,
        case.scale,
        block_m=block_m,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    assert relative_error(out, ref) <= TOL


# ---- backends end to end (store + attention) ---------------------------------------------------------
def backend_or_skip(name: str):
    reason = backend_unavailable_reason(name, CUDA)
    if reason is not None:
        pytest.skip(reason)
    return create_backend(name, CUDA)


def check_backend_step(backend, case: PagedCase) -> None:
    """The backend's output and cache writes equal the torch backend's on the same step."""
    k_want, v_want = case.k_cache.clone(), case.v_cache.clone()
    want = TorchAttentionBackend().forward(case.q, case.k, case.v, k_want, v_want, case.batch, case.scale)
    got = backend.forward(case.q, case.k, case.v, case.k_cache, case.v_cache, case.batch, case.scale)
    assert got.shape == want.shape
    assert relative_error(got, want) <= TOL
    torch.testing.assert_close(case.k_cache, k_want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(case.v_cache, v_want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("step", ["decode", "mixed"])
def test_triton_backend_matches_torch_backend(step: str, block_size: int) -> None:
    backend = backend_or_skip("triton")
    contexts = decode_contexts(block_size)
    query_lens, contexts = ([1] * len(contexts), contexts) if step == "decode" else mixed_prefill(block_size)
    case = make_paged_case(
        query_lens, contexts, 16, 8, 128, block_size, dtype=torch.bfloat16, device=CUDA, seed=len(step) + block_size
    )
    check_backend_step(backend, case)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", [(16, 8), (32, 4)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
def test_flash_attn_backend_mixed_step_matches_torch(heads: tuple[int, int], head_dim: int, block_size: int) -> None:
    backend = backend_or_skip("flash-attn")
    query_lens, contexts = mixed_prefill(block_size)
    case = make_paged_case(
        query_lens,
        contexts,
        *heads,
        head_dim,
        block_size,
        dtype=torch.bfloat16,
        device=CUDA,
        seed=head_dim + block_size,
        unused_fill=0.0,
    )  # FA4 needs finite unused slots
    check_backend_step(backend, case)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_flash_attn_backend_decode_step_matches_torch(block_size: int) -> None:
    backend = backend_or_skip("flash-attn")
    contexts = decode_contexts(block_size)
    case = make_paged_case(
        [1] * len(contexts),
        contexts,
        16,
        8,
        128,
        block_size,
        dtype=torch.bfloat16,
        device=CUDA,
        seed=block_size,
        unused_fill=0.0,
    )
    check_backend_step(backend, case)


# ---- decode in a CUDA graph -------------------------------------------------------------------------
class StaticDecode:
    """Static input buffers for one decode bucket, filled the way engine_service.core.cuda_graph does it."""

    def __init__(self, bucket: int, max_blocks: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.q = torch.zeros(bucket, num_heads, head_dim, dtype=torch.bfloat16, device=CUDA)
        self.k = torch.zeros(bucket, num_kv_heads, head_dim, dtype=torch.bfloat16, device=CUDA)
        self.v = torch.zeros_like(self.k)
        self.batch = ForwardBatch(
            input_ids=torch.zeros(bucket, dtype=torch.int64, device=CUDA),
            positions=torch.zeros(bucket, dtype=torch.int64, device=CUDA),
            slot_mapping=torch.full((bucket,), -1, dtype=torch.int64, device=CUDA),
            query_start_loc=torch.arange(bucket + 1, dtype=torch.int32, device=CUDA),
            seq_lens=torch.ones(bucket, dtype=torch.int32, device=CUDA),
            block_tables=torch.zeros(bucket, max_blocks, dtype=torch.int32, device=CUDA),
            logits_indices=torch.arange(bucket, dtype=torch.int64, device=CUDA),
            max_query_len=1,
            max_seq_len=max_blocks,  # static bounds, as the engine passes them
        )

    def load(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        n = batch.num_seqs
        self.q[:n].copy_(q)
        self.k[:n].copy_(k)
        self.v[:n].copy_(v)
        self.q[n:].normal_()  # padding rows carry garbage queries; their outputs are ignored
        self.batch.slot_mapping[:n].copy_(batch.slot_mapping)
        self.batch.slot_mapping[n:].fill_(-1)
        self.batch.seq_lens[:n].copy_(batch.seq_lens)
        self.batch.seq_lens[n:].fill_(1)
        self.batch.block_tables[:n, : batch.block_tables.shape[1]].copy_(batch.block_tables)


@pytest.mark.parametrize("name", ["triton", "flash-attn"])
def test_decode_cuda_graph_replay_matches_eager(name: str) -> None:
    backend = backend_or_skip(name)
    if not backend.supports_cuda_graphs:
        pytest.skip(f"{name} does not declare CUDA-graph support")
    bucket, real, block_size, max_blocks = 8, 5, 16, 200
    num_heads, num_kv_heads, head_dim = 16, 8, 128
    num_blocks = real * max_blocks + 1
    gen = torch.Generator(device=CUDA).manual_seed(0)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=CUDA).to(torch.bfloat16)  # finite everywhere (FA4)
    v_cache = torch.randn(shape, generator=gen, device=CUDA).to(torch.bfloat16)
    static = StaticDecode(bucket, max_blocks, num_heads, num_kv_heads, head_dim)
    scale = head_dim**-0.5

    def step():
        return backend.forward(static.q, static.k, static.v, k_cache, v_cache, static.batch, scale)

    for _ in range(2):  # warm-up outside capture (JIT); every slot is -1, so nothing is written
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()  # [bucket, Hq, D]

    for replay in range(4):
        # A new decode step: other lengths (up to the table width), other blocks, other inputs.
        lens = torch.randint(1, max_blocks * block_size + 1, (real,), generator=gen, device=CUDA).tolist()
        lens[0] = 1 + replay  # short contexts too
        order = torch.randperm(num_blocks, generator=gen, device=CUDA).tolist()
        tables = [order[i * max_blocks : i * max_blocks + -(-n // block_size)] for i, n in enumerate(lens)]
        batch = ForwardBatch.build([[0]] * real, [n - 1 for n in lens], tables, block_size, CUDA)
        q = torch.randn(real, num_heads, head_dim, generator=gen, device=CUDA).to(torch.bfloat16)
        k = torch.randn(real, num_kv_heads, head_dim, generator=gen, device=CUDA).to(torch.bfloat16)
        v = torch.randn(real, num_kv_heads, head_dim, generator=gen, device=CUDA).to(torch.bfloat16)
        static.load(q, k, v, batch)

        k_before, v_before = k_cache.clone(), v_cache.clone()
        graph_out.fill_(float("nan"))
        graph.replay()
        got = graph_out[:real].clone()
        k_graph, v_graph = k_cache.clone(), v_cache.clone()

        # Eager on the same static buffers: same shapes, same launch, so the same numbers.
        k_cache.copy_(k_before)
        v_cache.copy_(v_before)
        eager = step()[:real]
        if name == "triton":
            torch.testing.assert_close(got, eager, rtol=0, atol=0)
        else:
            assert relative_error(got, eager) <= 2e-3
        # Only the real rows' slots were written (padding rows have slot -1).
        k_want, v_want = k_before.clone(), v_before.clone()
        store_kv_reference(k, v, k_want, v_want, batch.slot_mapping)
        torch.testing.assert_close(k_graph, k_want, rtol=0, atol=0)
        torch.testing.assert_close(v_graph, v_want, rtol=0, atol=0)
        # And the answer is right.
        ref = paged_attention_reference(q, k_graph, v_graph, batch, scale)
        assert relative_error(got, ref) <= TOL, f"replay {replay}"
