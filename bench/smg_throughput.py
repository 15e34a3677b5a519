"""What the SMG gateway costs: the same streaming requests through SMG, straight to the engine, and offline.

One engine replica (``python -m engine_service``) and ``smg`` in front of it (as ``engine_service.cluster``
starts them, ``cache_aware`` routing fed by KV events), then, in one run:

1. **gRPC**: every request at once as a Generate stream straight to the engine (bench/service_throughput.py's
   client processes), the baseline for latency;
2. **SMG**: the same requests at once as streaming ``/v1/completions`` over HTTP/1.1 through SMG, from client
   processes that speak HTTP and server-sent events with asyncio streams alone (no openai/httpx needed);
3. **offline**: ``LLM.generate`` on the same prompts, after the server is gone (its GPU memory freed).

The engine's prefix cache is flushed (VllmEngine.FlushCache) before each timed phase, so no phase reuses the
last one's prompts. Prompts are text (SMG takes no token-id prompts): random pseudo-words cut to U[100,
max-input] tokens by the model's tokenizer; the gRPC and offline phases send those very ids, and each SMG
response's usage must report as many prompt tokens (the script fails otherwise). Every request ignores EOS.

Prints output tok/s of each path, SMG / offline (issue 13 asks >= 90% on the H200, 0.6B shape, 256 streams),
TTFT and inter-chunk latency percentiles, and SMG's added latency per token: the mean inter-chunk gap
through SMG minus the one straight over gRPC (one token per chunk at ``--stream-interval 1``).

    python bench/smg_throughput.py --model DIR [--num-requests 256] [--smg "python3 -m smg"]

``--smg``: how to start SMG (default: ``python -m smg`` when the ``smg`` package imports, e.g. a wheel
installed with ``pip install --no-deps --target DIR`` and DIR on PYTHONPATH; else ``smg`` on PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import shlex
import shutil
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_throughput import (
    add_server_options,
    cpu_seconds,
    free_port,
    offline,
    pct,
    run_clients,
    start_server,
    wait_serving,
)
from sse_client import SERVED_NAME, completion, http_client_process

from bench.common import append_results, bench_parser


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def text_workload(
    model: Path, n: int, seed: int, max_input: int, max_output: int
) -> tuple[list[str], list[list[int]], list[int]]:
    """``n`` text prompts of U[100, max_input] tokens (pseudo-words), their token ids, and output lengths
    U[100, max_output] (bench/throughput.py's ranges)."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    rng = random.Random(seed)
    texts, ids, out_lens = [], [], []
    for _ in range(n):
        target = rng.randint(min(100, max_input), max_input)
        words = " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(target))
        enc = tokenizer.encode(words)
        text = words[: enc.offsets[min(target, len(enc.offsets)) - 1][1]]
        texts.append(text)
        ids.append(tokenizer.encode(text).ids)
        out_lens.append(rng.randint(min(100, max_output), max_output))
    return texts, ids, out_lens


# ---- paired streams: SMG's added latency per token, free of the engine's step-time noise -------------------------
async def _grpc_arrivals(port: int, ids: list[int], max_tokens: int) -> list[float]:
    import grpc.aio

    from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc

    request = engine_pb2.GenerateRequest(
        prompt_token_ids=ids,
        sampling_params=engine_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
    )
    arrivals = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        async for response in engine_pb2_grpc.EngineServiceStub(channel).Generate(request):
            arrivals += [time.perf_counter()] * len(response.token_ids)
    return arrivals


async def _paired_round(engine_port: int, http_port: int, text: str, ids: list[int], max_tokens: int) -> list[float]:
    """One prompt as two concurrent greedy streams, one straight over gRPC and one through SMG: the engine
    computes both in the same steps, so the tokens of one step leave it at the same moment on both paths and
    the gap between their two arrivals is what SMG adds. Returns those gaps, or [] when the streams could
    not be paired (SMG merged tokens into fewer chunks, or no offset lines the steps up)."""
    body = dict(model=SERVED_NAME, prompt=text, max_tokens=max_tokens, temperature=0, ignore_eos=True, stream=True)
    body["stream_options"] = {"include_usage": True}
    direct, (tokens, _, gaps, _, _) = await asyncio.gather(
        _grpc_arrivals(engine_port, ids, max_tokens), completion(http_port, body, with_times=True)
    )
    through = gaps  # with_times: the arrival time of every text chunk
    if len(through) != len(direct) or tokens != len(direct) or len(direct) < 8:
        return []
    # The two may have been admitted a step or two apart: pair each gRPC token with the SMG token of the same
    # engine step (the offset whose arrivals agree best), leaving out each stream's first token.
    step = (direct[-1] - direct[0]) / (len(direct) - 1)

    def pairs(k: int) -> list[float]:
        return [through[i + k] - direct[i] for i in range(max(1, 1 - k), min(len(direct), len(through) - k))]

    added = min((pairs(k) for k in range(-2, 3)), key=lambda d: sorted(map(abs, d))[len(d) // 2])
    return added if abs(sorted(added)[len(added) // 2]) < step / 4 else []


def paired(engine_port: int, http_port: int, texts: list[str], ids: list[list[int]], rounds: int, n: int) -> dict:
    added: list[float] = []
    skipped = 0
    for r in range(rounds):
        gaps = asyncio.run(_paired_round(engine_port, http_port, texts[r % len(texts)], ids[r % len(ids)], n))
        skipped += not gaps
        added += gaps
    return {"added": sorted(added), "rounds": rounds, "skipped": skipped}


# ---- the servers ---------------------------------------------------------------------------------------------
_SMG_WITHOUT_SETPROCTITLE = (
    "import sys, types; sys.modules['setproctitle'] = types.SimpleNamespace(setproctitle=lambda title: None); "
    "sys.argv[0] = 'smg'; from smg.cli import main; main()"
)


def smg_prefix(arg: str | None) -> list[str]:
    if arg:
        return shlex.split(arg)
    if importlib.util.find_spec("smg") is not None:
        if importlib.util.find_spec("setproctitle") is None:
            # smg's launcher only names its process with it; a wheel installed --no-deps may lack it
            return [sys.executable, "-c", _SMG_WITHOUT_SETPROCTITLE]
        return [sys.executable, "-m", "smg"]
    found = shutil.which("smg")
    if found is None:
        raise SystemExit("no smg: install the gateway extra, or give --smg / a wheel on PYTHONPATH")
    return [found]


def wait_smg(http_port: int, smg: subprocess.Popen, timeout: float) -> None:
    """Until SMG answers a 1-token completion (its worker registered and healthy)."""
    body = json.dumps({"model": SERVED_NAME, "prompt": "warm up", "max_tokens": 1}).encode()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if smg.poll() is not None:
            raise RuntimeError(f"smg exited with code {smg.returncode}")
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/completions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError("smg did not serve a completion in time")


def flush(engine_port: int) -> None:
    import grpc

    from qwen3serve.smg import common_pb2, vllm_engine_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{engine_port}") as channel:
        reply = vllm_engine_pb2_grpc.VllmEngineStub(channel).FlushCache(common_pb2.FlushCacheRequest(), timeout=30)
    if not reply.success:
        raise RuntimeError(f"FlushCache failed: {reply.message}")


def served(args: argparse.Namespace, texts: list[str], ids: list[list[int]], out_lens: list[int]) -> dict:
    """Start the replica and SMG, run the gRPC phase then the SMG phase; returns both phases' results."""
    from engine_service.cluster import ClusterConfig, stop_all

    config = ClusterConfig(
        str(args.model),
        replicas=1,
        first_engine_port=free_port(),
        http_port=free_port(),
        prometheus_port=free_port(),
        served_model_name=SERVED_NAME,
    )
    port = config.engine_port(0)
    engine = start_server(args, port, ("--served-model-name", SERVED_NAME))
    processes = [engine]
    try:
        wait_serving(port, engine, timeout=600)
        with open(args.smg_log or os.devnull, "wb") as log:  # the child keeps its own copy of the file
            smg = subprocess.Popen(
                [*smg_prefix(args.smg), *config.smg_command()[1:], "--log-level", "warn"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        processes.append(smg)
        wait_smg(config.http_port, smg, timeout=120)
        flush(port)
        grpc_phase = run_clients(port, list(zip(ids, out_lens)), args.clients, args.temperature, engine.pid)
        flush(port)
        smg_cpu = cpu_seconds(smg.pid)
        smg_phase = run_clients(
            port,
            list(zip(texts, out_lens)),
            args.clients,
            args.temperature,
            engine.pid,
            client=http_client_process,
            client_port=config.http_port,
        )
        smg_phase["cpu_s"]["smg"] = cpu_seconds(smg.pid) - smg_cpu  # includes the last clients' tail
        phases = {"grpc": grpc_phase, "smg": smg_phase}
        if args.paired_rounds:
            flush(port)
            phases["paired"] = paired(port, config.http_port, texts, ids, args.paired_rounds, args.paired_tokens)
        return phases
    finally:
        stop_all(processes)


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--clients", type=int, default=8, help="client processes sharing the streams")
    add_server_options(p)
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--smg", default=None, help='command that starts SMG (e.g. "python3 -m smg")')
    p.add_argument("--smg-log", type=Path, default=None, help="write SMG's log here")
    p.add_argument(
        "--paired-rounds",
        type=int,
        default=0,
        help="then this many rounds of one greedy stream over gRPC and the same one through SMG, side by side",
    )
    p.add_argument("--paired-tokens", type=int, default=64, help="tokens per paired stream")
    p.add_argument("--json", type=Path, default=None, help="append the result as one JSON line")
    args = p.parse_args()
    texts, ids, out_lens = text_workload(args.model, args.num_requests, 0, args.max_input, args.max_output)
    phases = served(args, texts, ids, out_lens)
    counted = sorted(phases["smg"].pop("prompt_tokens"))
    mismatched = sum(a != b for a, b in zip(counted, sorted(map(len, ids)))) + abs(len(counted) - len(ids))
    if mismatched:
        raise SystemExit(f"SMG tokenized {mismatched} prompts to other lengths than the gRPC phase sent")
    rows = [(f"gRPC Generate x{args.num_requests} streams", phases["grpc"])]
    rows.append((f"SMG /v1/completions x{args.num_requests} streams", phases["smg"]))
    if not args.skip_offline:
        rows.insert(0, ("offline LLM.generate", offline(args, ids, out_lens)))
    print(f"\n{'path':<40} {'tokens':>8} {'seconds':>8} {'tok/s':>9} {'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15}")
    for name, r in rows:
        lat = (
            f"{pct(r['ttft'], 0.5) * 1e3:>7.0f}/{pct(r['ttft'], 0.99) * 1e3:<8.0f} "
            f"{pct(r['itl'], 0.5) * 1e3:>6.1f}/{pct(r['itl'], 0.99) * 1e3:<8.1f}"
            if "ttft" in r
            else ""
        )
        print(f"{name:<40} {r['tokens']:>8} {r['seconds']:>8.2f} {r['tokens'] / r['seconds']:>9.1f} {lat}")
    rate = {name: r["tokens"] / r["seconds"] for name, r in rows}
    smg_rate = rate[rows[-1][0]]
    if not args.skip_offline:
        print(f"SMG / offline: {smg_rate / rate['offline LLM.generate']:.1%}")
    print(f"SMG / gRPC: {smg_rate / rate[rows[-2][0]]:.1%}")
    for name, r in rows[-2:]:
        print(f"CPU seconds during {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_s"].items()))
    g, s = mean(phases["grpc"]["itl"]), mean(phases["smg"]["itl"])
    ttft = pct(phases["smg"]["ttft"], 0.5) - pct(phases["grpc"]["ttft"], 0.5)
    print(
        f"SMG added latency per token: {(s - g) * 1e3:+.2f} ms (mean inter-chunk gap {s * 1e3:.2f} ms through SMG, "
        f"{g * 1e3:.2f} ms straight over gRPC; stream interval {args.stream_interval}); "
        f"TTFT p50 added {ttft * 1e3:+.1f} ms"
    )
    if "paired" in phases:
        a, p = phases["paired"]["added"], phases["paired"]
        print(
            f"SMG added latency per token, paired streams: p50 {pct(a, 0.5) * 1e3:.2f} ms, "
            f"p90 {pct(a, 0.9) * 1e3:.2f} ms, mean {mean(a) * 1e3:.2f} ms over {len(a)} tokens "
            f"({p['rounds'] - p['skipped']} of {p['rounds']} rounds in step)"
        )
    append_results(
        args.json,
        {
            "bench": "smg_throughput",
            "num_requests": args.num_requests,
            **{f"tok_s[{name}]": round(v, 1) for name, v in rate.items()},
            "smg_added_ms_per_token": round((s - g) * 1e3, 3),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
