"""Decode-attention microbenchmark: achieved KV-read bandwidth per backend, against a copy ceiling.

Workload (defaults): 256 sequences with context lengths uniform in [100, 2100] (mean ~1.1k, seed 0),
16 query heads / 8 KV heads, head_dim 128, bf16, one new query token per sequence, random
non-contiguous block tables over a random-valued KV pool; block sizes 16 and 256.

Each row times the attention call alone (the KV store is not included) with
``triton.testing.do_bench`` (median; it warms up and flushes L2 before every call), and reports

    KV bandwidth = bytes of K and V read / time,  bytes = sum(seq_lens) * Hkv * D * 2 (K, V) * elem bytes

and its share of the device-to-device copy ceiling measured at the start of the same run
(``bench/ceilings.py``; ``--ceiling-tbps`` overrides it, for comparisons only). ``--graphs`` adds the same call
captured in a CUDA graph and timed by replay (what the engine does; it removes Python/launch overhead, ~100 us a
call for FlashAttention-4).
The copy ceiling is (read + written) bytes / time of a 2 GiB device-to-device copy, the usual convention
for copy bandwidth; a copy as large as one layer's KV is reported as a row too. The last line names the
backend ``--attention-backend auto`` picks on this GPU and whether it is the fastest row here.

Rows: ``triton`` (this project's split-K kernel, default heuristic, plus ``--sweep`` variants),
``flash-attn`` (FlashAttention-4 ``flash_attn_varlen_func`` with ``page_table``, if importable), and the
PyTorch reference on a tiny batch (``--ref-seqs`` sequences; it loops in Python, for scale only).

    python bench/attention_decode.py                       # on a CUDA machine
    python bench/attention_decode.py --graphs --sweep      # plus graph replay and triton tile variants
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

import torch

from bench.common import bench_parser
from qwen3.forward_batch import ForwardBatch


@dataclass
class Row:
    backend: str
    block_size: int
    config: str
    mode: str  # eager | graph
    median_us: float
    kv_bytes: int
    tbps: float  # achieved TB/s (1e12 bytes/s)
    pct_ceiling: float


@dataclass
class Workload:
    q: torch.Tensor  # [B, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    batch: ForwardBatch
    kv_bytes: int  # bytes of K and V the attention must read
    scale: float


def make_workload(
    lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> Workload:
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks) + 1
    order = torch.randperm(num_blocks, generator=gen, device=device).tolist()  # non-contiguous, unsorted tables
    tables, used = [], 0
    for n in blocks:
        tables.append(order[used : used + n])
        used += n
    batch = ForwardBatch.build([[0]] * len(lens), [n - 1 for n in lens], tables, block_size, device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # Random values: timings are never taken on zeros (docs rule; zero data can flatter a kernel).
    k_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen, device=device).to(dtype)
    kv_bytes = sum(lens) * num_kv_heads * head_dim * 2 * k_cache.element_size()
    return Workload(q, k_cache, v_cache, batch, kv_bytes, head_dim**-0.5)


def median_us(fn: Callable[[], object]) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def graph_median_us(fn: Callable[[], object]) -> float:
    """Median replay time of ``fn`` captured in a CUDA graph (warmed up eagerly first: JIT, autotuning)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_us(graph.replay)


def attention_fns(w: Workload, sweep: bool) -> list[tuple[str, str, Callable[[], object]]]:
    """(backend, config, call) for every backend importable here."""
    from qwen3.attention.kernels.decode_attention import choose_num_splits, paged_decode_attention

    b = w.batch
    splits = choose_num_splits(b.num_seqs, w.k_cache.shape[2], b.block_tables.shape[1] * w.k_cache.shape[1], w.q.device)
    fns: list[tuple[str, str, Callable[[], object]]] = [
        (
            "triton",
            f"auto (splits={splits}, block_n=64, warps=4, stages=2)",
            lambda: paged_decode_attention(w.q, w.k_cache, w.v_cache, b.block_tables, b.seq_lens, w.scale),
        ),
    ]
    if sweep:
        for num_splits in (1, 2, 4):
            for block_n, warps, stages in ((32, 4, 3), (64, 4, 3), (64, 8, 2), (128, 8, 2), (128, 4, 2)):
                fns.append(
                    (
                        "triton",
                        f"splits={num_splits}, block_n={block_n}, warps={warps}, stages={stages}",
                        lambda s=num_splits, n=block_n, nw=warps, ns=stages: paged_decode_attention(
                            w.q,
                            w.k_cache,
                            w.v_cache,
                            b.block_tables,
                            b.seq_lens,
                            w.scale,
                            num_splits=s,
                            block_n=n,
                            num_warps=nw,
                            num_stages=ns,
                        ),
                    )
                )
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except ImportError as exc:
        print(f"# flash-attn-4 not importable ({exc}); no flash-attn row")
    else:
        fns.append(
            (
                "flash-attn",
                "FA4 varlen + page_table",
                lambda: flash_attn_varlen_func(
                    w.q,
                    w.k_cache,
                    w.v_cache,
                    cu_seqlens_q=b.query_start_loc,
                    max_seqlen_q=1,
                    seqused_k=b.seq_lens,
                    page_table=b.block_tables,
                    softmax_scale=w.scale,
                    causal=True,
                ),
            )
        )
    return fns


def copy_row(kv_bytes: int, ceiling: float, device: torch.device) -> Row:
    src = torch.randint(0, 2**15, (kv_bytes // 2,), dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src))
    moved = 2 * kv_bytes  # read + write
    return Row(
        "d2d copy",
        0,
        f"{kv_bytes / 1e9:.2f} GB read + written",
        "eager",
        us,
        moved,
        moved / us / 1e6,
        100 * moved / us / 1e6 / ceiling,
    )


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--num-seqs", type=int, default=256, help="sequences in the decode batch (default 256)")
    parser.add_argument("--min-len", type=int, default=100, help="shortest context length (default 100)")
    parser.add_argument("--max-len", type=int, default=2100, help="longest context length (default 2100)")
    parser.add_argument("--num-heads", type=int, default=16, help="query heads (default 16)")
    parser.add_argument("--num-kv-heads", type=int, default=8, help="KV heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 256], help="KV block sizes (default 16 256)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument(
        "--ceiling-tbps",
        type=float,
        default=None,
        help="bandwidth ceiling in TB/s for the %% column (default: measured now, a 2 GiB d2d copy)",
    )
    parser.add_argument("--graphs", action="store_true", help="also time each call replayed from a CUDA graph")
    parser.add_argument("--sweep", action="store_true", help="also time triton split/tile variants")
    parser.add_argument("--ref-seqs", type=int, default=8, help="sequences for the torch-reference row (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.num_seqs,), generator=gen).tolist()
    print(
        f"# {args.num_seqs} seqs, context {args.min_len}..{args.max_len} (mean {sum(lens) / len(lens):.0f}), "
        f"{args.num_heads} q / {args.num_kv_heads} kv heads, head_dim {args.head_dim}, {args.dtype}, "
        f"{torch.cuda.get_device_name(device)}"
    )

    from bench.ceilings import copy_tbps

    measured = copy_tbps(device=device)
    ceiling = args.ceiling_tbps or measured
    print(
        f"# copy ceiling: {measured:.3f} TB/s measured now (2 GiB d2d, read + written)"
        + (f"; % column uses --ceiling-tbps {ceiling}" if args.ceiling_tbps else "")
    )
    rows: list[Row] = []
    for block_size in args.block_sizes:
        w = make_workload(lens, args.num_heads, args.num_kv_heads, args.head_dim, block_size, dtype, device, args.seed)
        for backend, config, fn in attention_fns(w, args.sweep):
            modes = [("eager", median_us)] + ([("graph", graph_median_us)] if args.graphs else [])
            for mode, timer in modes:
                us = timer(fn)
                tbps = w.kv_bytes / us / 1e6
                rows.append(Row(backend, block_size, config, mode, us, w.kv_bytes, tbps, 100 * tbps / ceiling))
        if args.ref_seqs:
            from qwen3.attention.torch_backend import paged_attention_reference

            small = make_workload(
                lens[: args.ref_seqs],
                args.num_heads,
                args.num_kv_heads,
                args.head_dim,
                block_size,
                dtype,
                device,
                args.seed,
            )
            us = median_us(lambda w=small: paged_attention_reference(w.q, w.k_cache, w.v_cache, w.batch, w.scale))
            tbps = small.kv_bytes / us / 1e6
            rows.append(
                Row(
                    "torch-ref",
                    block_size,
                    f"{args.ref_seqs} seqs only",
                    "eager",
                    us,
                    small.kv_bytes,
                    tbps,
                    100 * tbps / ceiling,
                )
            )
        del w
        torch.cuda.empty_cache()
    kv_bytes = next(r.kv_bytes for r in rows if r.backend == "triton")
    rows.append(copy_row(kv_bytes, ceiling, device))

    header = f"{'backend':<11} {'block':>5} {'mode':<6} {'median us':>10} {'KV TB/s':>8} {'% ceil':>7}  config"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.backend:<11} {r.block_size or '':>5} {r.mode:<6} {r.median_us:>10.1f} {r.tbps:>8.3f} "
            f"{r.pct_ceiling:>6.1f}%  {r.config}"
        )
    from qwen3.attention.backend import auto_backend_name

    auto = auto_backend_name(device, dtype)
    best = max(
        (r for r in rows if r.backend in ("triton", "flash-attn") and r.config.startswith(("auto", "FA4"))),
        key=lambda r: r.tbps,
    )
    verdict = "the fastest row" if best.backend == auto else f"NOT the fastest row ({best.backend} is)"
    print(f"auto picks {auto} on this GPU (compute capability {torch.cuda.get_device_capability(device)}): {verdict}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"copy_tbps": measured, "auto": auto, "fastest": best.backend, "rows": [asdict(r) for r in rows]},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
