"""Prefill utilisation: model FLOP/s of one batched prefill step against a bf16 matmul ceiling measured in the
same process (``bench/ceilings.py``: 8192^3 on random data).

Workload (defaults): 8 prompts of 4,096 random token ids, one output token each, prefilled in one step
(``max_num_batched_tokens`` = all prompt tokens), prefix caching off. Timed: ``LLM.generate`` end to end
(prefill, LM head on the 8 last tokens, sampling), median of ``--repeats`` after a warm-up.

FLOPs counted per step (what the hardware must do; no recomputation counted):

    linear  = 2 * tokens * (per-layer qkv + o + gate_up + down weights) * layers  +  2 * prompts * hidden * vocab
    attention (causal) = 2 (QK^T and PV) * 2 * heads * head_dim * sum over prompts of L (L + 1) / 2, per layer

    python bench/prefill.py --model /tmp/qwen3-8b-random
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

from bench.common import append_results, bench_parser


def prefill_flops(cfg: dict, prompt_lens: list[int]) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of prefilling ``prompt_lens`` with a Qwen3 config dict."""
    h, d, layers = (
        cfg["hidden_size"],
        cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        cfg["num_hidden_layers"],
    )
    hq, hkv, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + h * 2 * inter + inter * h
    tokens = sum(prompt_lens)
    linear = 2.0 * tokens * per_layer * layers + 2.0 * len(prompt_lens) * h * cfg["vocab_size"]
    attention = 4.0 * hq * d * layers * sum(n * (n + 1) / 2 for n in prompt_lens)
    return linear, attention


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--json", type=Path, help="append the result as a JSON line to this file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")

    from bench.ceilings import matmul_tflops
    from engine_service import LLM, SamplingParams

    ceiling = matmul_tflops()
    torch.cuda.empty_cache()
    cfg = json.loads((args.model / "config.json").read_text())
    rng = random.Random(0)
    tokens = args.num_prompts * args.prompt_len
    llm = LLM(
        args.model,
        attention_backend=args.attention_backend,
        max_model_len=args.prompt_len + 16,
        max_num_batched_tokens=tokens,
        max_num_seqs=max(args.num_prompts, 1),
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def prompts() -> list[list[int]]:  # fresh ids every run: nothing cached, nothing flattered
        return [[rng.randrange(10_000) for _ in range(args.prompt_len)] for _ in range(args.num_prompts)]

    llm.generate(prompts(), [params] * args.num_prompts)  # warm-up: JIT, autotuning, allocator
    times = []
    for _ in range(args.repeats):
        batch = prompts()
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(batch, [params] * args.num_prompts)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    linear, attention = prefill_flops(cfg, [args.prompt_len] * args.num_prompts)
    tflops = (linear + attention) / seconds / 1e12
    backend = llm.engine.runner.backend.name
    print(
        f"prefill {args.num_prompts} x {args.prompt_len} tokens, {backend}, {torch.cuda.get_device_name()}: "
        f"{seconds * 1e3:.1f} ms (runs {[round(t * 1e3, 1) for t in times]}), {tokens / seconds:,.0f} tok/s, "
        f"{tflops:.0f} TFLOP/s ({linear / 1e12:.0f} linear + {attention / 1e12:.0f} attention TFLOP) = "
        f"{100 * tflops / ceiling:.1f}% of the bf16 matmul ceiling measured now ({ceiling:.0f} TFLOP/s)"
    )
    append_results(
        args.json,
        {
            "bench": "prefill",
            "backend": backend,
            "model": str(args.model),
            "num_prompts": args.num_prompts,
            "prompt_len": args.prompt_len,
            "seconds": seconds,
            "tok_per_s": tokens / seconds,
            "tflops": tflops,
            "matmul_ceiling_tflops": ceiling,
            "utilisation": tflops / ceiling,
        },
    )
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
