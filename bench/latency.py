"""Batch-1 decode latency: milliseconds per output token for one request with a 512-token prompt.

The request is driven step by step through the engine's incremental interface; the first step (the
prefill, which also yields the first token) is timed apart, so ms/token covers decode steps only:

    ms/token = (time of the last token - time of the first token) / (output tokens - 1)

    python bench/latency.py --model DIR                     # default backend, CUDA graphs on
    python bench/latency.py --model DIR --profile 32        # + a torch-profiler table of 32 decode steps
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

import torch

from bench.common import add_engine_options, append_results, bench_parser, engine_options


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def one_request(llm, prompt: list[int], max_tokens: int, rid: str) -> tuple[float, float, int]:
    """Run one greedy request alone; return (prefill seconds, decode seconds, output tokens)."""
    from engine_service import SamplingParams

    engine = llm.engine
    engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    _sync()
    start = time.perf_counter()
    first = None
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += len(out.new_token_ids)
        if first is None and tokens:
            first = time.perf_counter()  # step() returns after the sampled token reached the host
    end = time.perf_counter()
    assert first is not None
    return first - start, end - first, tokens


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed requests (the median is reported)")
    add_engine_options(p)
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after timing, print a torch-profiler table for this many decode steps",
    )
    p.add_argument("--json", type=Path, help="append the result as a JSON line to this file")
    args = p.parse_args()

    from engine_service import LLM
    from qwen3.kernels import fused_elementwise_enabled

    rng = random.Random(0)
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    prompt = [rng.randrange(min(10_000, vocab)) for _ in range(args.prompt_len)]
    llm = LLM(
        args.model,
        **engine_options(args),
        max_model_len=args.prompt_len + args.output_len + 16,
        enable_prefix_caching=False,
    )
    one_request(llm, prompt, 16, "warm-up")
    runs = [one_request(llm, prompt, args.output_len, f"r{i}") for i in range(args.repeats)]
    ms_per_token = statistics.median(d / (n - 1) * 1e3 for _, d, n in runs)
    prefill_ms = statistics.median(pf * 1e3 for pf, _, _ in runs)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    backend = llm.engine.runner.backend.name
    graphs = "eager" if args.enforce_eager or llm.engine.runner.graph_runner is None else "CUDA graphs"
    fused = device != "cpu" and fused_elementwise_enabled()
    elementwise = "fused triton" if fused else "torch"
    steps = "async" if llm.engine.config.overlaps_steps else "sync"
    print(
        f"batch 1, prompt {args.prompt_len}, {args.output_len} output tokens, {backend}, {graphs}, "
        f"{elementwise} element-wise ops, {steps} steps; device: {device}"
    )
    print(
        f"prefill + first token: {prefill_ms:.2f} ms   decode: {ms_per_token:.3f} ms/token "
        f"({1e3 / ms_per_token:.0f} tok/s)   runs: {[round(d / (n - 1) * 1e3, 3) for _, d, n in runs]}"
    )
    if args.profile:
        from engine_service import SamplingParams

        engine = llm.engine
        engine.add_request(
            "profiled", prompt, SamplingParams(temperature=0.0, max_tokens=args.profile + 2, ignore_eos=True)
        )
        engine.step()  # prefill outside the profile
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            while engine.has_unfinished_requests():
                engine.step()
            _sync()
        sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25))
    append_results(
        args.json,
        {
            "bench": "latency",
            "backend": backend,
            "graphs": graphs,
            "device": device,
            "elementwise": elementwise,
            "steps": steps,
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "ms_per_token": ms_per_token,
            "prefill_ms": prefill_ms,
        },
    )
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
