"""Latency under load: a Poisson request-rate sweep through the gRPC EngineService.

One ``python -m engine_service`` subprocess serves every rate. At each rate r, requests arrive open-loop
with exponential gaps of mean 1/r s (seeded) for ``--duration`` seconds (at least ``--min-requests``),
each with a prompt and output length drawn as the throughput workload's (U[100, max-input] prompt ids,
U[100, max-output] output tokens, ignore_eos). ``--clients`` processes share the arrivals (a Python gRPC
client parses streamed messages slowly; one would lag at high rates) and stream every response. TTFT is
measured from the scheduled arrival, so a late client shows up as latency, and the lateness is reported.
The next rate starts once every request of this one has finished.

Per rate: p50 / p99 TTFT, p50 / p99 inter-token latency, achieved request and output-token throughput,
the client's mean / max lateness. Printed as a table and written as JSON (``--json``), which
bench/plot_sweep.py draws.

    python bench/load_sweep.py --model DIR [--rates 1 2 4 8 16 32 64] [--duration 15] --json sweep.json
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_throughput import _collect, add_server_options, free_port, pct, start_server, stream_request, wait_serving
from throughput import workload

from bench.common import bench_parser

Job = tuple[float, list[int], int]  # (arrival offset in seconds, prompt ids, output tokens)


def arrivals(rate: float, duration: float, min_requests: int, seed: int) -> list[float]:
    """Poisson arrival offsets (seconds from the rate's start): exponential gaps of mean 1 / rate, until
    ``duration`` has passed and at least ``min_requests`` have arrived."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration and len(times) >= min_requests:
            return times
        times.append(t)


async def _client(port: int, jobs: list[Job], temperature: float, ready, go) -> list[dict]:
    import grpc.aio

    from qwen3serve.engine.v1 import engine_pb2_grpc

    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        await channel.channel_ready()
        ready.put(True)
        start_at = await asyncio.to_thread(go.get)  # wall-clock time, the same for every client
        # Both clocks at once: wall-clock start_at (shared by every client process) on perf_counter's scale.
        base = time.perf_counter() + (start_at - time.time())

        async def one(offset: float, prompt: list[int], max_tokens: int) -> dict:
            scheduled = base + offset
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            late = time.perf_counter() - scheduled
            tokens, ttft, gaps, end = await stream_request(stub, prompt, max_tokens, temperature, scheduled)
            return {"tokens": tokens, "ttft": ttft, "itl": gaps, "end": end, "late": late}

        return await asyncio.gather(*(one(*job) for job in jobs))


def client_process(port: int, jobs: list[Job], temperature: float, ready, go, queue) -> None:
    try:
        queue.put(asyncio.run(_client(port, jobs, temperature, ready, go)))
    except BaseException as exc:  # reported, so the parent stops waiting for this client's result
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def run_rate(port: int, jobs: list[Job], num_clients: int, temperature: float) -> list[dict]:
    """Send ``jobs`` at their arrival offsets from ``num_clients`` processes; one record per request."""
    ctx = mp.get_context("spawn")
    queue, ready, go = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=client_process, args=(port, jobs[i::num_clients], temperature, ready, go, queue))
        for i in range(num_clients)
    ]
    for p in procs:
        p.start()
    _collect(ready, procs, queue, "connecting")  # every client connected before the clock starts
    start_at = time.time() + 0.2
    for _ in procs:
        go.put(start_at)
    results = _collect(queue, procs, queue, "running the rate")
    for p in procs:
        p.join()
    records = [r for share in results for r in share]
    for r in records:
        r["end"] -= start_at
    return records


def summarise(rate: float, records: list[dict]) -> dict:
    """One rate's row: latency percentiles (ms) and achieved throughput over the rate's span."""
    ttft = sorted(r["ttft"] for r in records)
    itl = sorted(g for r in records for g in r["itl"])
    span = max(r["end"] for r in records)  # first scheduled arrival is after 0; the last stream's end
    tokens = sum(r["tokens"] for r in records)
    return {
        "rate": rate,
        "requests": len(records),
        "output_tokens": tokens,
        "seconds": span,
        "achieved_req_per_s": len(records) / span,
        "output_tok_per_s": tokens / span,
        "ttft_p50_ms": pct(ttft, 0.5) * 1e3,
        "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
        "itl_p50_ms": pct(itl, 0.5) * 1e3,
        "itl_p99_ms": pct(itl, 0.99) * 1e3,
        "client_late_mean_ms": sum(r["late"] for r in records) / len(records) * 1e3,
        "client_late_max_ms": max(r["late"] for r in records) * 1e3,
    }


def main() -> int:
    p = bench_parser(__doc__)
    add_server_options(p)
    p.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="requests per second")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per rate")
    p.add_argument("--min-requests", type=int, default=8, help="requests per rate at least")
    p.add_argument("--clients", type=int, default=4, help="client processes sharing the arrivals")
    p.add_argument("--min-input", type=int, default=100, help="workload prompt lengths U[this, max-input]")
    p.add_argument("--min-output", type=int, default=100, help="workload output lengths U[this, max-output]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the sweep here")
    args = p.parse_args()
    for name in ("duration", "min_requests", "clients"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if any(r <= 0 for r in args.rates):
        p.error("--rates must all be > 0")

    port = free_port()
    server = start_server(args, port)
    rows = []
    try:
        wait_serving(port, server, timeout=600)
        run_rate(port, [(0.0, [1, 2, 3], 4)], 1, args.temperature)  # warm-up (JIT, allocator, channels)
        print(
            f"{'req/s':>7} {'sent':>5} {'got req/s':>9} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} "
            f"{'ITL p50':>8} {'p99':>7} {'late max':>8}  (ms)"
        )
        for i, rate in enumerate(args.rates):
            times = arrivals(rate, args.duration, args.min_requests, args.seed + i)
            prompts, out_lens = workload(
                len(times), args.seed + i, args.min_input, args.max_input, args.min_output, args.max_output
            )
            row = summarise(rate, run_rate(port, list(zip(times, prompts, out_lens)), args.clients, args.temperature))
            rows.append(row)
            print(
                f"{rate:>7g} {row['requests']:>5} {row['achieved_req_per_s']:>9.2f} {row['output_tok_per_s']:>8.0f} "
                f"{row['ttft_p50_ms']:>9.1f} {row['ttft_p99_ms']:>8.1f} {row['itl_p50_ms']:>8.2f} "
                f"{row['itl_p99_ms']:>7.2f} {row['client_late_max_ms']:>8.1f}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=60)
    if args.json:
        # .perf-commit names the commit of a copied tree (the device gets a copy, not this checkout's history)
        marker = Path(".perf-commit")
        commit = marker.read_text().strip() if marker.is_file() else ""
        commit = (
            commit
            or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        )
        sweep = {
            "model": str(args.model),
            "commit": commit or "unknown",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "workload": {
                "max_input": args.max_input,
                "max_output": args.max_output,
                "duration_s": args.duration,
                "temperature": args.temperature,
                "max_num_seqs": args.max_num_seqs,
            },
            "rates": rows,
        }
        args.json.write_text(json.dumps(sweep, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
