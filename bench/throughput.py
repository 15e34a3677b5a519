"""Offline throughput on the standard workload, optionally against transformers' continuous batching.

Workload (nano-vLLM's): N requests (default 256), seed 0, prompt lengths uniform in [100, 1024] of
random token ids in [0, 10000), output lengths uniform in [100, 1024], ignore_eos, all submitted at
once. Output tok/s = generated tokens / wall seconds (weights loaded and warmed up beforehand).

    python bench/throughput.py --model DIR                  # this engine
    python bench/throughput.py --model DIR --hf             # ... and transformers, same run
    python bench/throughput.py --make-model qwen3-0.6b      # write a random-weight checkpoint first
"""

from __future__ import annotations

import argparse
import gzip
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

import torch

from bench.common import add_engine_options, append_results, bench_parser, engine_options, sync


def workload(
    n: int, seed: int, min_in: int, max_in: int, min_out: int, max_out: int
) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 9999) for _ in range(rng.randint(min_in, max_in))] for _ in range(n)]
    outputs = [rng.randint(min_out, max_out) for _ in range(n)]
    return prompts, outputs


def run_engine(args: argparse.Namespace, prompts: list[list[int]], out_lens: list[int]) -> dict:
    from engine_service import LLM, SamplingParams

    llm = LLM(
        args.model,
        **engine_options(args),
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    params = [SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))  # warm-up (JIT, allocator)
    sync(args.device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(args.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    if args.profile:
        profile_steps(llm, prompts, params, args.profile)
    overlap = "async" if llm.engine.config.overlaps_steps else "sync"
    result = {
        "engine": f"qwen3-serve ({llm.engine.runner.backend.name}, {overlap} steps)",
        "output_tokens": tokens,
        "seconds": seconds,
        "output_tok_s": tokens / seconds,
        "kv_blocks": llm.engine.block_manager.num_blocks,
        "preemptions": llm.engine.scheduler.num_preemptions_total,
    }
    llm.shutdown()
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def profile_steps(llm, prompts: list[list[int]], params: list, window: str, trace: Path | None = None) -> None:
    """Re-run the workload up to step START, then profile COUNT steps (torch profiler: CPU and CUDA time
    per op, and wall vs GPU time per step), then abort the rest. ``trace``: also write the profile as a
    gzipped Chrome trace there (host calls and device kernels on one time line: where the device idles)."""
    start, count = (int(x) for x in window.split(":"))
    engine = llm.engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"profile-{i}", p, sp)
    for _ in range(start):
        engine.step()
    running = len(engine.scheduler.running)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(count):  # the same number of steps without the profiler's overhead, just before
        engine.step()
    sync(dev)
    plain = (time.perf_counter() - t0) / count
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(count):
            engine.step()
        sync("cuda" if torch.cuda.is_available() else "cpu")
    wall = (time.perf_counter() - t0) / count
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / count / 1e3 if torch.cuda.is_available() else 0.0
    print(
        f"\nprofile: from step {start}, {running} running sequences: wall {plain * 1e3:.2f} ms/step for {count} "
        f"steps unprofiled, then {wall * 1e3:.2f} ms/step for {count} under the profiler, GPU busy {gpu:.2f} ms/step"
    )
    sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=20))
    if trace is not None:
        raw = trace.with_suffix("")  # the profiler writes plain JSON; gzip keeps it a few MB
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        print(f"chrome trace: {trace}")
    for i in range(len(prompts)):
        engine.abort_request(f"profile-{i}")


def run_transformers(args: argparse.Namespace, prompts: list[list[int]], out_lens: list[int]) -> dict:
    """transformers' own continuous batching (``paged|sdpa``), per-request max_new_tokens, no EOS stop."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    if device == "cpu":  # transformers 5.17 sizes its paged cache from free GPU memory: 0 on a CPU
        raise SystemExit(
            "--hf/--hf-only need a CUDA device (transformers' continuous batching sizes its KV cache "
            "from free GPU memory)"
        )
    model = (
        AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32, attn_implementation="paged|sdpa"
        )
        .to(device)
        .eval()
    )
    gen = GenerationConfig(
        max_new_tokens=max(out_lens),
        do_sample=args.temperature > 0,
        temperature=args.temperature or None,
        eos_token_id=-1,
        pad_token_id=0,
    )
    sync(args.device)
    start = time.perf_counter()
    tokens = 0
    with model.continuous_batching_context_manager(generation_config=gen, block=True, timeout=30) as manager:
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(prompts, out_lens)]
        pending = set(ids)
        while pending:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                pending.discard(result.request_id)
                tokens += len(result.generated_tokens)
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped before finishing")
    sync(args.device)
    seconds = time.perf_counter() - start
    return {
        "engine": "transformers continuous batching (paged|sdpa)",
        "output_tokens": tokens,
        "seconds": seconds,
        "output_tok_s": tokens / seconds,
    }


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--model", type=Path, help="checkpoint directory (or use --make-model)")
    p.add_argument(
        "--make-model", metavar="PRESET", help="write a random-weight checkpoint of this preset (bf16) first"
    )
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-input", type=int, default=100)
    p.add_argument("--max-input", type=int, default=1024)
    p.add_argument("--min-output", type=int, default=100)
    p.add_argument("--max-output", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6)
    add_engine_options(p, max_model_len=4096)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--hf", action="store_true", help="also run transformers' continuous batching on the same workload")
    p.add_argument("--hf-only", action="store_true", help="only run transformers")
    p.add_argument(
        "--profile",
        metavar="START:COUNT",
        help="after the timed run, profile COUNT engine steps starting at step START",
    )
    p.add_argument("--json", type=Path, help="append results as JSON lines to this file")
    args = p.parse_args()
    if args.make_model:
        from qwen3.testing import write_checkpoint

        args.model = args.model or Path(tempfile.mkdtemp(prefix=f"{args.make_model}-"))
        if not (args.model / "config.json").exists():
            write_checkpoint(args.model, args.make_model, dtype=torch.bfloat16, with_tokenizer=False)
    if args.model is None:
        p.error("--model or --make-model is required")
    prompts, out_lens = workload(
        args.num_requests, args.seed, args.min_input, args.max_input, args.min_output, args.max_output
    )
    results = []
    if not args.hf_only:
        results.append(run_engine(args, prompts, out_lens))
    if args.hf or args.hf_only:
        results.append(run_transformers(args, prompts, out_lens))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(
        f"\nworkload: {args.num_requests} requests, input [{args.min_input}, {args.max_input}], "
        f"output [{args.min_output}, {args.max_output}], seed {args.seed}; device: {device}"
    )
    print(f"{'engine':<48} {'output tokens':>14} {'seconds':>9} {'output tok/s':>13}")
    for r in results:
        print(f"{r['engine']:<48} {r['output_tokens']:>14} {r['seconds']:>9.2f} {r['output_tok_s']:>13.1f}")
    if len(results) == 2:
        print(f"ratio: {results[0]['output_tok_s'] / results[1]['output_tok_s']:.1f}x")
    append_results(args.json, *({**r, "device": device} for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
