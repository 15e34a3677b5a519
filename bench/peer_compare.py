"""Ours against nano-vLLM on nano-vLLM's own benchmark workload, in alternating pairs in one call.

Runs ``PEER_DIR/peer_bench.py`` (the shared peer folder: nano-vLLM's exact bench workload, 256 requests,
133,966 output tokens, one engine per process) as nano-vLLM, ours, nano-vLLM, ours, ... ``--pairs`` times,
each in a fresh process, and reports both engines' medians and the median of the per-pair ratios. A ratio
measured side by side is the only figure that survives a shared, noisy machine (pairs moved 1.15x-1.37x
between calls). nano-vLLM runs on FlashAttention-4 through the peer folder's shim, so the calling process
needs flash_attn.cute importable (shared/device/README.md: the two-call FA4 staging) and xxhash.

    python bench/peer_compare.py --model /tmp/qwen3-0.6b-random --peer-dir ../shared/peer --pairs 3
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from bench.common import append_results, bench_parser

ROOT = Path(__file__).resolve().parent.parent
_RESULT = re.compile(r"PEER (\S+) .*?= ([0-9.]+) tok/s")


def run_one(which: str, model: Path, peer_dir: Path, extra: list[str], log, timeout: float) -> float | None:
    """One engine's run of the workload in a fresh process; its output tok/s, or None if it failed."""
    env = dict(os.environ)
    # nano-vLLM and the FA2 shim from the peer folder; our engine from this checkout.
    first = str(peer_dir) if which == "nanovllm" else str(ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (first, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(peer_dir / "peer_bench.py"), which, str(model), *extra]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"# {which}: timed out after {timeout:.0f} s", flush=True)
        return None
    log.write(
        f"$ {' '.join(cmd)}  (rc {proc.returncode}, {time.perf_counter() - t:.1f} s)\n{proc.stdout}\n{proc.stderr}\n"
    )
    log.flush()
    match = _RESULT.search(proc.stdout)
    if proc.returncode or not match:
        print(f"# {which}: rc {proc.returncode}, no result; last stderr: {proc.stderr.strip()[-600:]}", flush=True)
        return None
    print(
        f"{which:<9} {float(match.group(2)):>10,.0f} tok/s   ({time.perf_counter() - t:.0f} s with start-up)",
        flush=True,
    )
    return float(match.group(2))


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--peer-dir", type=Path, default=ROOT.parent / "shared" / "peer")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--timeout", type=float, default=240, help="seconds per engine run")
    p.add_argument("--log", type=Path, default=Path("peer.log"))
    p.add_argument("--json", type=Path, help="append the summary as a JSON line to this file")
    p.add_argument("ours", nargs="*", default=[], help="key=value options for our LLM (e.g. attention_backend=triton)")
    args = p.parse_args()
    if not (args.peer_dir / "peer_bench.py").is_file():
        p.error(f"--peer-dir: no peer_bench.py in {args.peer_dir}")

    peer, ours, ratios = [], [], []
    with args.log.open("a") as log:
        for _ in range(args.pairs):
            a = run_one("nanovllm", args.model, args.peer_dir, [], log, args.timeout)
            b = run_one("project", args.model, args.peer_dir, args.ours, log, args.timeout)
            peer += [a] if a else []
            ours += [b] if b else []
            if a and b:
                ratios.append(b / a)
    if not ratios:
        print("no complete pair: see the log")
        return 1
    summary = {
        "bench": "peer",
        "model": str(args.model),
        "ours_options": args.ours,
        "pairs": len(ratios),
        "nanovllm_tok_s": peer,
        "ours_tok_s": ours,
        "ratios": ratios,
        "median_nanovllm": statistics.median(peer),
        "median_ours": statistics.median(ours),
        "median_ratio": statistics.median(ratios),
    }
    print(
        f"median of {len(ratios)} pairs: nano-vLLM {summary['median_nanovllm']:,.0f} tok/s, ours "
        f"{summary['median_ours']:,.0f} tok/s, ratio {summary['median_ratio']:.2f}x "
        f"(pairs {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    append_results(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
