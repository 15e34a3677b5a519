"""The standard workload through the gRPC EngineService, against the offline engine in the same run.

1. Service: ``python -m engine_service`` as a subprocess on a free loopback port; once health says
   SERVING, client processes open all the Generate streams at once and count streamed tokens, while
   this process samples GetLoad (how many requests the engine runs at once). The server then exits,
   so its GPU memory is free before
2. Offline: ``LLM.generate`` on the workload (as bench/throughput.py) in this process.
Prints output tok/s of both, their ratio, both engines' KV block counts (they must match for a fair
ratio), and the service's TTFT / inter-token latency percentiles and mean concurrency.

    python bench/service_throughput.py --model DIR [--num-requests 256] [--clients 8] [--stream-interval 1]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing as mp
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import workload

from bench.common import bench_parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline(args: argparse.Namespace, prompts: list[list[int]], out_lens: list[int]) -> dict:
    import torch

    from engine_service import LLM, SamplingParams

    llm = LLM(args.model, **engine_options(args))
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    params = [SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True) for n in out_lens]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    kv_blocks = llm.engine.block_manager.num_blocks
    llm.shutdown()
    del llm
    torch.cuda.empty_cache()
    return {"tokens": tokens, "seconds": seconds, "kv_blocks": kv_blocks}


def engine_options(args: argparse.Namespace) -> dict:
    return dict(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_block_size=args.kv_block_size,
        max_model_len=args.max_model_len,
        attention_backend=args.attention_backend,
    )


async def _client(port: int, jobs: list[tuple[list[int], int]], temperature: float, ready, go) -> dict:
    import grpc.aio

    from qwen3serve.engine.v1 import engine_pb2_grpc

    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        await channel.channel_ready()
        ready.put(os.getpid())
        await asyncio.to_thread(go.wait)  # every client connected: all streams open at once
        cpu_start = _own_cpu_seconds()

        def one(prompt: list[int], max_tokens: int):
            return stream_request(stub, prompt, max_tokens, temperature, time.perf_counter())

        results = await asyncio.gather(*(one(p, n) for p, n in jobs))
    return client_result(results, cpu_start)


def client_result(results: list[tuple], cpu_start: float) -> dict:
    """One client process's report from its streams' (tokens, TTFT, inter-token gaps, end time, ...)."""
    return {
        "tokens": sum(r[0] for r in results),
        "ttft": [r[1] for r in results],
        "cpu_s": _own_cpu_seconds() - cpu_start,
        "itl": [g for r in results for g in r[2]],
        "end": max(r[3] for r in results),
    }


async def stream_request(
    stub, prompt: list[int], max_tokens: int, temperature: float, t0: float
) -> tuple[int, float, list[float], float]:
    """One Generate stream read to its end: (output tokens, time to the first token since ``t0``
    (a ``time.perf_counter()`` value), inter-token gaps (a message of n tokens counts n gaps of 1/n
    of its wait), wall-clock end time)."""
    from qwen3serve.engine.v1 import engine_pb2

    last, ttft, gaps, tokens = t0, None, [], 0
    request = engine_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        sampling_params=engine_pb2.SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True),
    )
    async for response in stub.Generate(request):
        now = time.perf_counter()
        n = len(response.token_ids)
        if n:
            if ttft is None:
                ttft = now - t0
            else:
                gaps.extend([(now - last) / n] * n)
            last = now
            tokens += n
    return tokens, ttft or 0.0, gaps, time.time()


def run_client(client, port: int, jobs, temperature: float, ready, go, queue) -> None:
    """A client process's body: run the ``client`` coroutine function, put its result (or error) on ``queue``."""
    try:
        queue.put(asyncio.run(client(port, jobs, temperature, ready, go)))
    except BaseException as exc:  # reported, so the parent stops waiting for this client's result
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


client_process = functools.partial(run_client, _client)  # picklable: spawned processes import it by name


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def start_server(args: argparse.Namespace, port: int, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """``python -m engine_service`` on ``port`` with the engine options of ``args`` and ``extra`` (not yet
    SERVING: see ``wait_serving``)."""
    cmd = [
        sys.executable,
        "-m",
        "engine_service",
        "--model",
        str(args.model),
        "--port",
        str(port),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--kv-block-size",
        str(args.kv_block_size),
        "--max-model-len",
        str(args.max_model_len),
        "--attention-backend",
        args.attention_backend,
        "--stream-interval",
        str(args.stream_interval),
        "--log-level",
        "WARNING",
        *extra,
    ]
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        cmd, cwd=root, env={**os.environ, "PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}"}
    )


def service(args: argparse.Namespace, prompts: list[list[int]], out_lens: list[int]) -> dict:
    port = free_port()
    server = start_server(args, port)
    try:
        wait_serving(port, server, timeout=600)
        return run_clients(port, list(zip(prompts, out_lens)), args.clients, args.temperature, server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)


def run_clients(
    port: int,
    jobs: list,
    num_clients: int,
    temperature: float,
    server_pid: int,
    client=client_process,
    client_port: int | None = None,
) -> dict:
    """Open every Generate stream at once from ``num_clients`` client processes and wait for them all
    (``client``: another client process function, e.g. bench/smg_throughput.py's HTTP one, talking to
    ``client_port``; GetLoad is still asked of the engine on ``port``).

    The clock starts when every client has connected. Returns output tokens, seconds, KV blocks, the
    CPU seconds of the server, its children and each client over the run, the mean number of running
    requests (GetLoad), and the clients' TTFT and inter-token gaps.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    shares = [jobs[i::num_clients] for i in range(num_clients)]
    ready, go = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=client, args=(client_port or port, share, temperature, ready, go, queue)) for share in shares
    ]
    for p in procs:
        p.start()
    # CPU time of the server process and of the engine process it spawned, over the timed run:
    # a process whose CPU seconds approach the run's wall time is the bottleneck.
    watched = {"server": server_pid, **{f"its child {pid}": pid for pid in _children(server_pid)}}
    _collect(ready, procs, queue, "connecting")
    cpu_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    start_at = time.time()
    go.set()
    running, kv_blocks = _sample_load(port, queue, procs)
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in watched.items()}
    results = _collect(queue, procs, queue, "finishing")
    for p in procs:
        p.join()
    seconds = max(r["end"] for r in results) - start_at
    cpu.update({f"client {i}": r["cpu_s"] for i, r in enumerate(results)})
    return {
        "prompt_tokens": [n for r in results for n in r.get("prompt_tokens", ())],  # when clients count them
        "tokens": sum(r["tokens"] for r in results),
        "seconds": seconds,
        "kv_blocks": kv_blocks,
        "cpu_s": cpu,
        "mean_running": sum(running) / len(running) if running else float("nan"),
        "ttft": sorted(t for r in results for t in r["ttft"]),
        "itl": sorted(g for r in results for g in r["itl"]),
    }


def _collect(source, procs: list, results, stage: str) -> list:
    """One item per client process from ``source``. Raises as soon as a client reports an error (on
    ``results``) or dies without one (a signal), instead of waiting for it forever."""
    import queue as queue_module

    items: list = []
    while len(items) < len(procs):
        try:
            item = source.get(timeout=1.0)
        except queue_module.Empty:
            codes = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if not codes:
                continue
            item = results.get(timeout=1.0) if not results.empty() else {"error": f"exit code {codes[0]}"}
        if isinstance(item, dict) and "error" in item:
            raise RuntimeError(f"a client failed while {stage}: {item['error']}")
        items.append(item)
    return items


def _sample_load(port: int, queue, procs: list) -> tuple[list[int], int]:
    """GetLoad every 50 ms until the clients' results start arriving; returns (num_running samples taken
    while anything ran, the server's KV block count)."""
    import grpc

    from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc

    running: list[int] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        kv_blocks = stub.GetModelInfo(engine_pb2.GetModelInfoRequest()).num_kv_blocks
        idle = 0
        while queue.empty() and not any(p.exitcode not in (None, 0) for p in procs):
            load = stub.GetLoad(engine_pb2.GetLoadRequest())
            if load.num_running or load.num_waiting:
                running.append(load.num_running)
            else:
                idle += 1
            time.sleep(0.05)
    print(f"GetLoad samples: {len(running)} busy, {idle} idle", flush=True)
    return running, kv_blocks


def wait_serving(port: int, server: subprocess.Popen, timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.time() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"engine server exited with code {server.returncode}")
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(1.0)
    raise TimeoutError("engine server did not become SERVING")


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def add_server_options(p: argparse.ArgumentParser) -> None:
    """The server's engine options and the workload's shape (shared with bench/load_sweep.py)."""
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kv-block-size", type=int, default=256)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--max-input", type=int, default=1024, help="workload prompt lengths U[100, this]")
    p.add_argument("--max-output", type=int, default=1024, help="workload output lengths U[100, this]")
    p.add_argument("--stream-interval", type=int, default=1, help="the server's tokens per streamed message")


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument(
        "--clients",
        type=int,
        default=8,
        help="client processes sharing the streams (Python gRPC clients "
        "open 64 streams on one channel slowly: 4 processes doubled the median TTFT on the H100)",
    )
    add_server_options(p)
    p.add_argument("--skip-offline", action="store_true")
    args = p.parse_args()
    prompts, out_lens = workload(args.num_requests, 0, 100, args.max_input, 100, args.max_output)
    rows = []
    s = service(args, prompts, out_lens)  # first: the server's process exits and frees its GPU memory
    if not args.skip_offline:
        rows.append(("offline LLM.generate", offline(args, prompts, out_lens)))
    rows.append((f"gRPC Generate x{args.num_requests} streams", s))
    print(f"\n{'path':<34} {'tokens':>9} {'seconds':>9} {'output tok/s':>13}")
    for name, r in rows:
        print(f"{name:<34} {r['tokens']:>9} {r['seconds']:>9.2f} {r['tokens'] / r['seconds']:>13.1f}")
    if len(rows) == 2:
        ratio = (rows[1][1]["tokens"] / rows[1][1]["seconds"]) / (rows[0][1]["tokens"] / rows[0][1]["seconds"])
        print(f"service / offline: {ratio:.1%}")
    print(
        "KV blocks: "
        + ", ".join(f"{name} {r['kv_blocks']}" for name, r in rows)
        + f"; service mean running requests {s['mean_running']:.0f}"
    )
    print(
        "CPU seconds during the service run: "
        + ", ".join(f"{k} {v:.1f}" for k, v in s["cpu_s"].items())
        + f"; server CPU per streamed token {s['cpu_s']['server'] / s['tokens'] * 1e6:.1f} us"
        + f" (stream interval {args.stream_interval})"
    )
    print(
        f"service TTFT p50 {pct(s['ttft'], 0.5) * 1e3:.0f} ms, p99 {pct(s['ttft'], 0.99) * 1e3:.0f} ms; "
        f"inter-token p50 {pct(s['itl'], 0.5) * 1e3:.1f} ms, p99 {pct(s['itl'], 0.99) * 1e3:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
