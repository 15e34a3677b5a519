"""Host time of an engine step, without the model: what the GPU waits for on every (synchronous) step.

The model call is replaced by fixed logits, so what remains is scheduling, batch assembly, the sampler's
batch build, sampling itself on the stub's device, and applying the sampled tokens. Each piece is timed
by wrapping the function that does it.

    python bench/host_overhead.py --model DIR [--num-seqs 256] [--steps 50]
"""

from __future__ import annotations

import collections
import functools
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

import torch

from bench.common import bench_parser


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.6)
    args = p.parse_args()

    from engine_service import LLM, SamplingParams
    from engine_service.core.sampler import SamplingBatch
    from qwen3.forward_batch import BlockTableRows, ForwardBatch

    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    llm = LLM(
        args.model,
        device="cpu",
        max_model_len=1024,
        num_kv_blocks=args.num_seqs * 40,
        kv_block_size=16,
        max_num_seqs=args.num_seqs,
    )
    engine = llm.engine
    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(fn, key: str):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[key] += time.perf_counter() - start

        return wrapper

    engine.scheduler.schedule = timed(engine.scheduler.schedule, "schedule")
    engine._finish = timed(engine._finish, "apply sampled tokens")
    build_batch = timed(ForwardBatch.build, "ForwardBatch.build")
    SamplingBatch.build = timed(SamplingBatch.build, "SamplingBatch.build")
    logits = torch.randn(args.num_seqs, vocab)
    block_size = engine.runner.block_size

    table_rows = BlockTableRows()  # kept between steps, as the model runner keeps its own

    def stub_execute(step):  # the batch is still built (host work, as ModelRunner.execute builds it); no model
        build_batch(
            step.input_token_ids(),
            step.context_lens,
            step.block_tables,
            block_size,
            "cpu",
            step.sample_rows,
            table_rows,
        )
        return logits[: sum(step.sample_rows)]

    engine.runner.execute = stub_execute
    rng = random.Random(0)
    for i in range(args.num_seqs):
        engine.add_request(
            f"r{i}",
            [rng.randrange(min(vocab, 10_000)) for _ in range(rng.randint(50, 200))],
            SamplingParams(temperature=args.temperature, max_tokens=args.steps + 400, ignore_eos=True),
        )
    while engine.scheduler.waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    seconds.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    total = (time.perf_counter() - start) / args.steps
    print(
        f"{args.num_seqs} running sequences, model stubbed: {total * 1e3:.3f} ms per step in all "
        f"(sampling itself runs on the CPU here)"
    )
    for key, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {key:<22} {value / args.steps * 1e3:.3f} ms")
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
