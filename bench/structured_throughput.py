"""Structured-output overhead: N concurrent JSON-schema requests against the same N unconstrained, in one run.

Workload: N requests (default 256) submitted at once, seed 0, prompts of random token ids (lengths uniform in
[--min-input, --max-input]), each generating --output-len tokens. The constrained pass gives every request the
same JSON schema (an array of at least 64 objects with an integer, a string and an array of strings: a
grammar with nesting and free strings that cannot complete within the output length, so both passes generate
the same number of tokens; EOS is never allowed before the grammar completes). The unconstrained pass uses
ignore_eos. Each pass is timed after a warm-up that also compiles the grammar (the compiler's cache then
serves every request). Reported: output tok/s of each pass, their ratio (issue 14's target: >= 0.90 on an
H200), and each pass's host time per step split by engine phase (the bitmask fill runs on a worker thread;
`mask_wait` is the engine thread's wait for it).

    python bench/structured_throughput.py --model DIR [--json results.jsonl] [--profile 40:20]

Ran on the H200 (docs/BENCHMARKS.md section 8); its CPU run with tiny settings is tests/test_bench_scripts.py.
"""

from __future__ import annotations

import cProfile
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

import torch

from bench.common import add_engine_options, append_results, bench_parser, engine_options, sync
from bench.throughput import profile_steps, workload

SCHEMA = {
    "type": "array",
    "minItems": 64,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["id", "name", "tags"],
    },
}


class PhaseTimer:
    """Wall time spent inside named methods (wrapped in place), to split a step's host time by phase.

    ``on_step`` (called after each engine step) records that step's share of every phase, so the steady
    state can be told from the ramp-up (admission, prefill) and the tail."""

    def __init__(self, targets: dict[str, tuple[object, str]]) -> None:
        self.seconds = dict.fromkeys(targets, 0.0)
        self.calls = dict.fromkeys(targets, 0)
        self.steps: list[dict[str, float]] = []  # per step: phase -> ms, plus "rows" (sampled rows)
        self._last = dict(self.seconds)
        for name, (obj, attr) in targets.items():
            setattr(obj, attr, self._timed(name, getattr(obj, attr)))

    def on_step(self, rows: int) -> None:
        self.steps.append({"rows": rows, **{k: (v - self._last[k]) * 1e3 for k, v in self.seconds.items()}})
        self._last = dict(self.seconds)

    def steady_state(self, min_rows: int) -> str:
        """Median ms per phase over the steps with at least ``min_rows`` rows, and where the pass's time went."""
        steady = [s for s in self.steps if s["rows"] >= min_rows]
        if not steady:
            return "no step had that many rows"
        median = {k: statistics.median(s[k] for s in steady) for k in self.seconds}
        total = sum(s["step"] for s in self.steps)
        first = next(i for i, s in enumerate(self.steps) if s["rows"] >= min_rows)
        ramp = sum(s["step"] for s in self.steps[:first])
        return (
            f"{len(steady)} steps with >= {min_rows} rows, median ms: "
            + " ".join(f"{k} {v:.2f}" for k, v in median.items())
            + f"; of {total:.0f} ms in steps: {ramp:.0f} before the first such step ({first} steps), "
            f"{sum(s['step'] for s in steady):.0f} in them, the rest in {len(self.steps) - first - len(steady)} others"
        )

    def _timed(self, name, fn):  # type: ignore[no-untyped-def]
        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)
        self.steps, self._last = [], dict(self.seconds)

    def per_step(self, steps: int) -> str:
        return " ".join(f"{k} {v / steps * 1e3:.2f}" for k, v in self.seconds.items())


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (with its tokenizer files)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-input", type=int, default=100)
    p.add_argument("--max-input", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6)
    add_engine_options(p, max_model_len=2048)
    p.add_argument("--json", type=Path, help="append the result as a JSON line to this file")
    p.add_argument("--cprofile", type=Path, help="write each pass's cProfile stats to CPROFILE.<pass> (host time)")
    p.add_argument(
        "--profile",
        metavar="START:COUNT",
        help="after the timed passes, profile COUNT steps of the JSON-schema workload from its step START (torch "
        "profiler: wall vs device-busy time per step, the ops that take the device's time)",
    )
    p.add_argument(
        "--trace",
        type=Path,
        help="with --profile: write each pass's profiled steps as a gzipped Chrome trace to TRACE.<pass>.json.gz "
        "(the unconstrained pass is profiled too)",
    )
    p.add_argument(
        "--fill-threads", type=int, help="threads of xgrammar's bitmask fill (default: the engine's FILL_THREADS)"
    )
    args = p.parse_args()
    if args.fill_threads is not None:
        from engine_service.core import structured_output

        structured_output.FILL_THREADS = args.fill_threads

    from engine_service import LLM, SamplingParams
    from engine_service.constraints import ConstraintKind, OutputConstraint
    from engine_service.core.structured_output import MaskJob

    prompts, _ = workload(args.num_requests, 0, args.min_input, args.max_input, 1, 1)
    constraint = OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
    n = args.output_len
    constrained = [
        SamplingParams(temperature=args.temperature, seed=i, max_tokens=n, constraint=constraint)
        for i in range(len(prompts))
    ]
    free = [
        SamplingParams(temperature=args.temperature, seed=i, max_tokens=n, ignore_eos=True) for i in range(len(prompts))
    ]

    with LLM(args.model, **engine_options(args)) as llm:
        device = llm.engine.runner.device.type
        llm.generate([[1, 2, 3]], [SamplingParams(max_tokens=4, constraint=constraint)])  # warm-up: JIT, compiler
        phases = PhaseTimer(
            {
                "step": (llm.engine, "step"),
                "schedule": (llm.engine.scheduler, "schedule"),
                "launch": (llm.engine.executor, "launch"),
                "wait": (llm.engine.executor, "wait"),
                "apply": (llm.engine.scheduler, "apply"),
                "accept": (llm.engine.structured, "accept"),
                "fill": (llm.engine.structured, "_fill"),  # on the worker thread
                "mask_wait": (MaskJob, "result"),  # the engine thread's wait for it, and the mask's copy
                "prepare": (llm.engine.executor, "prepare_sampling"),
                "sample": (llm.engine.executor, "sample"),
            }
        )
        engine = llm.engine
        step = engine.step

        def recorded_step():  # type: ignore[no-untyped-def]
            outputs = step()
            phases.on_step(len(outputs))
            return outputs

        engine.step = recorded_step
        results = {}
        for name, params in (("json_schema", constrained), ("unconstrained", free)):
            sync(device)
            phases.reset()
            profiler = cProfile.Profile() if args.cprofile else None
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            outs = llm.generate(prompts, params)
            if profiler:
                profiler.disable()
                profiler.dump_stats(f"{args.cprofile}.{name}")
            sync(device)
            seconds = time.perf_counter() - start
            steps = max(phases.calls["step"], 1)
            print(f"{name}: host ms per step ({steps} steps; wait = blocked on the device): {phases.per_step(steps)}")
            print(f"{name}: steady state: {phases.steady_state(int(0.9 * len(prompts)))}")
            tokens = sum(len(o.token_ids) for o in outs)
            results[name] = {
                "output_tokens": tokens,
                "seconds": seconds,
                "output_tok_s": tokens / seconds,
                "fill_ms_per_step": phases.seconds["fill"] / max(phases.calls["fill"], 1) * 1e3,
            }
            print(f"{name:<14} {tokens:>8} tokens {seconds:8.2f} s {tokens / seconds:10.1f} tok/s")
        ratio = results["json_schema"]["output_tok_s"] / results["unconstrained"]["output_tok_s"]
        fill_ms = results["json_schema"]["fill_ms_per_step"]
        print(f"structured/unconstrained output tok/s ratio {ratio:.3f}; host bitmask fill {fill_ms:.2f} ms/step")
        append_results(
            args.json,
            {
                "bench": "structured_throughput",
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "num_requests": args.num_requests,
                "output_len": n,
                **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()},
                "ratio": ratio,
                "bitmask_fill_ms_per_step": fill_ms,
            },
        )
        if args.profile:
            trace = args.trace
            profile_steps(
                llm, prompts, constrained, args.profile, trace and trace.with_name(f"{trace.name}.json_schema.json.gz")
            )
            if trace:
                profile_steps(llm, prompts, free, args.profile, trace.with_name(f"{trace.name}.unconstrained.json.gz"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
