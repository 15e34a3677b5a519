"""What streaming costs the server process, without a model: the EngineService in front of a synthetic
engine that produces tokens at a fixed rate, measured at each ``--stream-interval``.

    python bench/stream_overhead.py [--streams 256] [--tokens 200] [--rate 18000] [--stream-intervals 1 4]

For each interval a server process (this script with ``--serve``) runs the real servicer, AsyncEngine
and DeltaBatcher, with ``SyntheticEngine`` in a thread of the same process (no pipe, no engine process):
every step gives each running request its next token, steps paced so that all streams together get
``--rate`` tokens/s (18,000 is what the H100 engine makes on the standard workload). Client processes
(bench/service_throughput.py's) open every stream at once. Printed per interval: output tok/s, and the
server process's CPU seconds, per streamed token and as a share of one core. The synthetic engine's own
work (one small object per token) is inside the server's figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_throughput import free_port, pct, run_clients, wait_serving

from bench.common import bench_parser
from engine_service.protocol import EngineInfo, EngineStats, FinishReason, RequestOutput
from engine_service.sampling_params import SamplingParams


class SyntheticEngine:
    """Stands in for ``LLMEngine`` behind ``AsyncEngine.in_thread``: no model, no KV cache; each step
    emits token 7 for every running request, paced to ``rate`` tokens/s over all requests."""

    def __init__(self, rate: float) -> None:
        self.info = EngineInfo(
            vocab_size=151_936,
            max_model_len=1 << 20,
            eos_token_ids=(0,),
            dtype="none",
            tensor_parallel_size=1,
            kv_block_size=1,
            num_kv_blocks=1,
            attention_backend="synthetic",
            max_waiting_requests=1 << 20,
        )
        self.rate = rate
        self.dead_reason: str | None = None
        self._left: dict[str, int] = {}  # request id -> tokens still to produce
        self._due = time.perf_counter()  # when the next step may run

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self._left),
            num_waiting=0,
            kv_cache_usage=0.0,
            num_kv_blocks=1,
            num_preemptions_total=0,
            prefix_cache_hit_rate=0.0,
        )

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *_: object) -> None:
        """``LLMEngine.add_request``'s arguments; ``priority`` and ``cache_salt``, the rest, are ignored."""
        self._left[request_id] = params.max_tokens  # one sample (n = 1)

    def abort_request(self, request_id: str, index: int | None = None) -> list[RequestOutput]:
        if self._left.pop(request_id, None) is None:
            return []
        return [RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ABORTED)]

    def has_unfinished_requests(self) -> bool:
        return bool(self._left)

    def pop_embeddings(self) -> list:
        return []  # no Embed requests here

    def take_failed(self) -> list[tuple[str, Exception]]:
        return []  # no request fails here (LLMEngine's: constraints that do not compile)

    def step(self) -> list[RequestOutput]:
        self._due += len(self._left) / self.rate
        delay = self._due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            self._due = time.perf_counter()  # fell behind (the server is the bottleneck): no catch-up burst
        outputs = []
        for request_id in list(self._left):
            self._left[request_id] -= 1
            if self._left[request_id]:
                outputs.append(RequestOutput(request_id, [7]))
            else:
                del self._left[request_id]
                outputs.append(RequestOutput(request_id, [7], finished=True, finish_reason=FinishReason.LENGTH))
        return outputs

    def shutdown(self) -> None:
        pass


async def serve(port: int, stream_interval: int, rate: float) -> None:
    from engine_service.server import start_engine_server
    from service_common.server import serve_until_signal

    running = await start_engine_server(
        lambda: SyntheticEngine(rate), "synthetic", port=port, stream_interval=stream_interval
    )
    await serve_until_signal(running.server, running.health, grace_s=1.0)
    await running.stop(0)


def measure(args: argparse.Namespace, stream_interval: int) -> dict:
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            str(port),
            "--rate",
            str(args.rate),
            "--stream-intervals",
            str(stream_interval),
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}"},
    )
    try:
        wait_serving(port, server, timeout=120)
        return run_clients(port, [([1, 2, 3], args.tokens)] * args.streams, args.clients, 1.0, server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--tokens", type=int, default=200, help="output tokens per stream")
    p.add_argument("--rate", type=float, default=18_000.0, help="the synthetic engine's tokens/s over all streams")
    p.add_argument("--stream-intervals", type=int, nargs="+", default=[1, 4])
    p.add_argument("--clients", type=int, default=2, help="client processes")
    p.add_argument("--serve", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)  # the server side
    args = p.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.stream_intervals[0], args.rate))
        return 0
    print(
        f"{args.streams} streams x {args.tokens} tokens, synthetic engine at {args.rate:.0f} tok/s, "
        f"{args.clients} client processes"
    )
    print(
        f"{'interval':>8} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'server CPU s':>13} {'us/token':>9} "
        f"{'% of a core':>12} {'TTFT p50 ms':>12}"
    )
    for interval in args.stream_intervals:
        r = measure(args, interval)
        server_cpu = r["cpu_s"]["server"]
        print(
            f"{interval:>8} {r['tokens']:>8} {r['seconds']:>8.2f} {r['tokens'] / r['seconds']:>8.0f} "
            f"{server_cpu:>13.2f} {server_cpu / r['tokens'] * 1e6:>9.1f} {server_cpu / r['seconds']:>12.0%} "
            f"{pct(r['ttft'], 0.5) * 1e3:>12.0f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
