"""Draw bench/load_sweep.py's JSON as a PNG: TTFT and inter-token latency (p50, p99) against the offered
request rate, with the achieved output throughput beside them. Runs anywhere matplotlib is installed
(``pip install -e ".[bench]"``): the GPU machine writes the JSON, this draws it.

    python bench/plot_sweep.py sweep.json docs/load_sweep.png [--title "0.6B on an H200"]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_parser


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("sweep", type=Path, help="bench/load_sweep.py --json output")
    p.add_argument("png", type=Path)
    p.add_argument("--title", default=None, help="default: the sweep's model, commit and date")
    args = p.parse_args()
    sweep = json.loads(args.sweep.read_text())
    rows = sorted(sweep.get("rates") or [], key=lambda r: r["rate"])
    if not rows:
        p.error(f"{args.sweep}: no rates to draw")

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rates = [r["rate"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("ttft", "time to first token (ms)"), ("itl", "inter-token latency (ms)"))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(rates, [r[f"{key}_p50_ms"] for r in rows], "o-", label="p50")
        ax.plot(rates, [r[f"{key}_p99_ms"] for r in rows], "s--", label="p99")
        ax.set_yscale("log")
        ax.set_ylabel(label)
    ax = axes[2]
    ax.plot(rates, [r["output_tok_per_s"] for r in rows], "o-", color="tab:green")
    ax.set_ylabel("achieved output tokens / s")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("offered load (requests / s, Poisson)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.suptitle(args.title or f"{sweep.get('model', '?')} at {sweep.get('commit', '?')}, {sweep.get('date', '?')}")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png} ({len(rows)} rates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
