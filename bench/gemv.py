"""The decode linear layers at M <= 8: the Triton GEMV (qwen3.kernels.gemv) against torch.matmul (cuBLAS) and
against the weight-read floor at the device-to-device copy ceiling measured in the same process (bench/ceilings.py).

Shapes: Qwen3-0.6B (qkv [4096, 1024], o [1024, 2048], gate_up [6144, 1024], down [1024, 3072], LM head
[151936, 1024]) and 8B (qkv [6144, 4096], o [4096, 4096], gate_up [24576, 4096], down [4096, 12288]), bf16.
A row per (shape, M): microseconds for each, the GEMV's weight bytes / time in TB/s and as % of the copy
ceiling (the copy counts read + written; a GEMV only reads, so 100% is the floor's rate), and the layer sum
per token for each model (what one decode step's GEMMs cost, LM head included).

    python bench/gemv.py                    # M = 1, 2, 4, 8
    python bench/gemv.py --m 1 --sweep      # also time alternative tile configs; prints the best per shape
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import copy_tbps, median_ms
from common import append_results, bench_parser

SHAPES = {  # model -> (layer, N, K, times per token)
    "0.6B": [
        ("qkv", 4096, 1024, 28),
        ("o", 1024, 2048, 28),
        ("gate_up", 6144, 1024, 28),
        ("down", 1024, 3072, 28),
        ("lm_head", 151936, 1024, 1),
    ],
    "8B": [
        ("qkv", 6144, 4096, 36),
        ("o", 4096, 4096, 36),
        ("gate_up", 24576, 4096, 36),
        ("down", 4096, 12288, 36),
        ("lm_head", 151936, 4096, 1),
    ],
}


def sweep_configs(m: int, k: int):  # type: ignore[no-untyped-def]
    from qwen3.kernels.gemv import GemvConfig

    k_steps = lambda bk: -(-k // bk)  # noqa: E731
    if m == 1:
        grid = itertools.product([4, 8, 16, 32], [128, 256, 512, 1024], [1, 2, 4, 8], [4, 8])
        for bn, bk, split, warps in grid:
            if bk <= k and split <= max(1, k_steps(bk) // 2):
                yield GemvConfig(1, bn, bk, split, warps)
    else:
        for bn, bk, split, warps in itertools.product([16, 32, 64], [64, 128, 256], [1, 2, 4, 8], [4, 8]):
            if bk <= k and split <= max(1, k_steps(bk) // 2):
                yield GemvConfig(16, bn, bk, split, warps)


def time_shape(m: int, n: int, k: int, sms: int, sweep: bool) -> tuple[float, float, object, str]:
    """(GEMV us, torch.matmul us, the default config, the sweep's best as text) for x [m, k] and W [n, k]."""
    from qwen3.kernels.gemv import default_config, gemv

    x = torch.randn(m, k, device="cuda").bfloat16()
    w = (torch.randn(n, k, device="cuda") * k**-0.5).bfloat16()
    cfg = default_config(m, n, k, sms)
    t_gemv = median_ms(lambda: gemv(x, w, None, cfg)) * 1e3
    t_mm = median_ms(lambda: torch.matmul(x, w.t())) * 1e3
    best = ""
    if sweep:
        timed = [(median_ms(lambda c=c: gemv(x, w, None, c)) * 1e3, c) for c in sweep_configs(m, k)]
        t_best, c_best = min(timed, key=lambda pair: pair[0])
        best = f"; best {t_best:.1f} us {c_best}"
    return t_gemv, t_mm, cfg, best


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8], help="rows of x (1..8)")
    parser.add_argument("--sweep", action="store_true", help="time alternative tile configs too (slow: minutes)")
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line per row to this file")
    args = parser.parse_args()

    copy = copy_tbps()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: copy ceiling {copy:.3f} TB/s (read + written), {sms} SMs")
    print("model layer     M      N     K  gemv us   mm us floor us  TB/s  %copy  vs mm  config")
    records = []
    for m in args.m:
        for model, shapes in SHAPES.items():
            totals = {"gemv": 0.0, "mm": 0.0, "floor": 0.0}
            for layer, n, k, count in shapes:
                t_gemv, t_mm, cfg, best = time_shape(m, n, k, sms, args.sweep)
                floor = n * k * 2 / (copy * 1e12) * 1e6  # us: the weights read once at the copy rate
                tbps = n * k * 2 / (t_gemv * 1e-6) / 1e12
                print(
                    f"{model:5} {layer:8} {m:2} {n:6} {k:5} {t_gemv:8.1f} {t_mm:7.1f} {floor:8.1f} {tbps:5.2f} "
                    f"{100 * tbps / copy:5.1f}% {t_mm / t_gemv:5.2f}x  {cfg}{best}"
                )
                totals["gemv"] += count * t_gemv
                totals["mm"] += count * t_mm
                totals["floor"] += count * floor
                records.append(
                    dict(
                        bench="gemv",
                        model=model,
                        layer=layer,
                        m=m,
                        n=n,
                        k=k,
                        gemv_us=t_gemv,
                        matmul_us=t_mm,
                        floor_us=floor,
                        tbps=tbps,
                        copy_tbps=copy,
                    )
                )
            print(
                f"{model} M={m} per token (layers x count + LM head): gemv {totals['gemv'] / 1e3:.3f} ms, "
                f"torch.matmul {totals['mm'] / 1e3:.3f} ms, floor {totals['floor'] / 1e3:.3f} ms"
            )
    append_results(args.json, *records)


if __name__ == "__main__":
    main()
