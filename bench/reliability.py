"""Reliability figures of the real processes on CPU (demo model, loopback): the docs/RELIABILITY.md "Measured" table.

Starts ``python -m engine_service`` and ``python -m tokenizer_service`` as subprocesses and measures, in turn:
streams held at once through the tokenizer service; a burst of Generate calls against a small waiting queue;
the fuzzer's hostile requests (tests/fuzzer.py) against both processes; the tokenizer's link to the engine
lost (engine server killed) and recovered (engine restarted on the same port); the engine's child process
killed mid-stream; SIGTERM mid-stream to each server. After each phase where the engine lives on, GetLoad
must show an empty KV pool (nothing lost). Prints one markdown table. Every loop is bounded in count and time.

    .venv/bin/python bench/reliability.py [--model DIR] [--streams 1000] [--burst 3000] [--fuzz 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
from fuzzer import fuzz  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from serving import free_port  # noqa: E402

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc  # noqa: E402
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc  # noqa: E402

SERVING = health_pb2.HealthCheckResponse.SERVING
ENGINE = "qwen3serve.engine.v1.EngineService"
TOKENIZER = "qwen3serve.tokenizer.v1.TokenizerService"
MAX_MODEL_LEN = 512


class Proc:
    """One server subprocess, its port and its log file."""

    def __init__(self, name: str, args: list[str], port: int, logs: Path) -> None:
        self.name, self.port = name, port
        self.log = logs / f"{name}-{len(list(logs.iterdir()))}.log"  # one log per process
        self.popen = subprocess.Popen(
            [sys.executable, "-m", *args, "--port", str(port)],
            cwd=REPO,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def engine_child(self) -> int:
        """The pid of the engine process this engine server spawned."""
        # Any thread may have spawned it (the server loads the engine from a worker thread).
        children = [
            pid
            for task in Path(f"/proc/{self.popen.pid}/task").iterdir()
            for pid in (task / "children").read_text().split()
        ]
        for pid in children:
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
        raise RuntimeError(f"{self.name} has no engine child process: {children}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def start_engine(model: Path, logs: Path, port: int | None = None, *extra: str) -> Proc:
    return Proc(
        "engine",
        [
            "engine_service",
            "--model",
            str(model),
            "--device",
            "cpu",
            "--num-kv-blocks",
            "256",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            *extra,
        ],
        port or free_port(),
        logs,
    )


def start_tokenizer(model: Path, engine: Proc, logs: Path, *extra: str) -> Proc:
    return Proc(
        "tokenizer",
        [
            "tokenizer_service",
            "--model",
            str(model),
            "--engine",
            engine.target,
            "--engine-probe-interval",
            "0.2",
            *extra,
        ],
        free_port(),
        logs,
    )


async def health(target: str, service: str, timeout: float = 1.0) -> int | None:
    """The health status, or None when the server does not answer."""
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            return (
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout
                )
            ).status
    except grpc.aio.AioRpcError:
        return None


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Seconds until ``predicate`` holds (polled every 50 ms); AssertionError after ``timeout``."""
    start = time.perf_counter()
    while not await predicate():
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)
    return time.perf_counter() - start


async def serving(proc: Proc, service: str, timeout: float = 180) -> None:
    async def ok() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}; see {proc.log}")
        return await health(proc.target, service) == SERVING

    await until(ok, timeout, f"{proc.name} SERVING")


async def kv_empty(engine: Proc) -> str:
    """'KV pool full (0 running, 0 waiting)' once GetLoad says so (within 10 s), else what it says."""
    async with grpc.aio.insecure_channel(engine.target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        load = None
        for _ in range(200):
            load = await stub.GetLoad(engine_pb2.GetLoadRequest(), timeout=5)
            if load.kv_cache_usage == 0 and load.num_running == 0 and load.num_waiting == 0:
                return "KV pool full (every block free), 0 running, 0 waiting"
            await asyncio.sleep(0.05)
    return f"NOT EMPTY: usage {load.kv_cache_usage}, {load.num_running} running, {load.num_waiting} waiting"


def _chat(i: int, max_tokens: int) -> tokenizer_pb2.ChatRequest:
    return tokenizer_pb2.ChatRequest(
        messages=[tokenizer_pb2.ChatMessage(role="user", content=f"stream {i}: tell me a story")],
        sampling_params=engine_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )


def _generate(i: int, max_tokens: int) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(
        prompt_token_ids=[100 + i % 1000, 11, 1879],
        sampling_params=engine_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )


async def _streams(
    target: str, calls: int, make_call, channels: int = 10, timeout: float = 300
) -> tuple[Counter, Counter, list[float]]:
    """Open ``calls`` streams at once over ``channels`` channels; (statuses, last finish reasons,
    seconds from start to each stream's first message)."""
    statuses, reasons, first = Counter(), Counter(), []
    opened = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    start = time.perf_counter()

    async def one(i: int) -> None:
        last = None
        try:
            async for response in make_call(opened[i % channels], i, timeout):
                if last is None:
                    first.append(time.perf_counter() - start)
                last = response
            statuses["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            statuses[exc.code().name] += 1
        if last is not None and last.finish_reason:
            reasons[engine_pb2.FinishReason.Name(last.finish_reason)] += 1

    try:
        await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        for channel in opened:
            await channel.close()
    return statuses, reasons, first


def chat_call(max_tokens: int):
    return lambda ch, i, t: tokenizer_pb2_grpc.TokenizerServiceStub(ch).Chat(_chat(i, max_tokens), timeout=t)


def generate_call(max_tokens: int):
    return lambda ch, i, t: engine_pb2_grpc.EngineServiceStub(ch).Generate(_generate(i, max_tokens), timeout=t)


def fmt(counter: Counter) -> str:
    return ", ".join(f"{n} {k}" for k, n in counter.most_common()) or "none"


async def exit_status(proc: Proc, within: float) -> str:
    for _ in range(int(within / 0.1)):
        if proc.popen.poll() is not None:
            return f"exited {proc.popen.returncode}"
        await asyncio.sleep(0.1)
    return f"still running after {within:.0f} s"


async def fault(
    streams: Callable[[], Awaitable[tuple[Counter, Counter, list[float]]]], inflict: Callable[[], None], after_s: float
) -> tuple[Counter, Counter]:
    """Run ``streams`` and ``inflict`` a fault once they have run ``after_s`` seconds."""
    task = asyncio.ensure_future(streams())
    await asyncio.sleep(after_s)
    inflict()
    statuses, reasons, _ = await task
    return statuses, reasons


class Rows(list):
    """The table's rows; each is also printed when measured, so a run that fails later still shows it."""

    def append(self, row: tuple[str, str]) -> None:
        print(f"| {row[0]} | {row[1]} |", flush=True)
        super().append(row)


async def measure(args: argparse.Namespace, logs: Path) -> list[tuple[str, str]]:
    rows = Rows()
    model = args.model
    engine = start_engine(model, logs)
    tokenizer = start_tokenizer(model, engine, logs)
    procs = [engine, tokenizer]
    try:
        await serving(engine, ENGINE)
        await serving(tokenizer, TOKENIZER)

        # 1. Streams held at once through the tokenizer service.
        start = time.perf_counter()
        statuses, reasons, first = await _streams(tokenizer.target, args.streams, chat_call(8))
        rows.append(
            (
                "streams held concurrently",
                (
                    f"{args.streams} Chat streams opened at once through the tokenizer service (8 tokens each): "
                    f"{fmt(statuses)}; finish {fmt(reasons)}; {time.perf_counter() - start:.1f} s; "
                    f"first message after {max(first, default=0):.1f} s at worst; {await kv_empty(engine)}"
                ),
            )
        )

        # 2. Bad inputs: the fuzzer against both processes.
        tally = await fuzz(engine.target, tokenizer.target, args.fuzz, args.seed)
        print(tally.summary(), flush=True)
        per_status = Counter()
        for (_, _, status), n in tally.counts.items():
            per_status[status] += n
        rows.append(
            (
                "bad inputs tried",
                (
                    f"{tally.total} fuzzed requests (seed {args.seed}; "
                    f"{fmt(Counter(m for (_, m, _) in tally.counts.elements()))})"
                    f": {fmt(per_status)}; {len(tally.findings)} outside the documented statuses "
                    f"({fmt(Counter(f.status + ' ' + f.mode for f in tally.findings))}); both servers "
                    f"{'SERVING' if await health(tokenizer.target, TOKENIZER) == SERVING else 'NOT SERVING'} after; "
                    f"{await kv_empty(engine)}"
                ),
            )
        )

        # 3. Tokenizer-engine link lost (engine server killed mid-stream), then the engine restarted.
        statuses, _ = await fault(
            lambda: _streams(tokenizer.target, 20, chat_call(200)), lambda: engine.popen.kill(), 1.5
        )
        engine.popen.wait()
        down = await until(lambda: _not_serving(tokenizer, TOKENIZER), 10, "tokenizer NOT_SERVING")
        restarted = time.perf_counter()
        engine = start_engine(model, logs, engine.port)
        procs.append(engine)
        await serving(engine, ENGINE)
        back = await until(lambda: _serving(tokenizer, TOKENIZER), 30, "tokenizer SERVING again")
        after, _, _ = await _streams(tokenizer.target, 5, chat_call(4))
        rows.append(
            (
                "fault: tokenizer-engine link lost",
                (
                    f"engine server SIGKILLed under 20 Chat streams: {fmt(statuses)}; tokenizer NOT_SERVING "
                    f"{down:.2f} s later; engine restarted on its port (SERVING after "
                    f"{time.perf_counter() - restarted - back:.1f} s): tokenizer SERVING {back:.2f} s after "
                    f"that, then 5 Chats: {fmt(after)}"
                ),
            )
        )

        # 4. The engine's own process killed mid-stream.
        child = engine.engine_child()
        statuses, _ = await fault(
            lambda: _streams(engine.target, 20, generate_call(200)), lambda: os.kill(child, signal.SIGKILL), 1.5
        )
        down = await until(lambda: _not_serving(engine, ENGINE), 10, "engine NOT_SERVING")
        chats, _, _ = await _streams(tokenizer.target, 5, chat_call(4), timeout=10)
        rows.append(
            (
                "fault: engine process killed mid-stream",
                (
                    f"engine child SIGKILLed under 20 Generate streams: {fmt(statuses)}; engine health NOT_SERVING "
                    f"after {down:.2f} s; new Chats: {fmt(chats)}; engine server {await exit_status(engine, 10)}"
                ),
            )
        )
        engine.stop()
        tokenizer.stop()

        # 5. A burst against a small waiting queue.
        engine = start_engine(model, logs, None, "--max-waiting-requests", str(args.max_waiting))
        procs.append(engine)
        await serving(engine, ENGINE)
        start = time.perf_counter()
        statuses, _, _ = await _streams(engine.target, args.burst, generate_call(4))
        rows.append(
            (
                "burst",
                (
                    f"{args.burst} Generate calls at once, --max-waiting-requests {args.max_waiting}: "
                    f"{fmt(statuses)} in {time.perf_counter() - start:.1f} s; {await kv_empty(engine)}"
                ),
            )
        )

        # 6. SIGTERM mid-stream: the engine (Generate streams), then the tokenizer service (Chat streams).
        for name, make_calls in (
            ("engine", lambda e, t: _streams(e.target, 20, generate_call(400))),
            ("tokenizer", lambda e, t: _streams(t.target, 20, chat_call(400))),
        ):
            engine.stop()
            engine = start_engine(model, logs, None, "--grace-period", str(args.grace))
            tokenizer = start_tokenizer(model, engine, logs, "--grace-period", str(args.grace))
            procs += [engine, tokenizer]
            await serving(engine, ENGINE)
            await serving(tokenizer, TOKENIZER)
            target = engine if name == "engine" else tokenizer
            signalled = time.perf_counter()
            statuses, reasons = await fault(
                lambda: make_calls(engine, tokenizer), lambda: target.popen.send_signal(signal.SIGTERM), 1.5
            )
            ended = time.perf_counter() - signalled + 1.5
            rows.append(
                (
                    f"fault: SIGTERM to the {name} mid-stream",
                    (
                        f"--grace-period {args.grace}, 20 streams of 400 tokens: {fmt(statuses)}; last messages' "
                        f"finish {fmt(reasons)}; streams over {ended - 1.5:.1f} s after the signal; "
                        f"{name} server {await exit_status(target, args.grace + 10)}; traceback in its log: "
                        f"{'yes' if 'Traceback' in target.log.read_text() else 'no'}"
                    ),
                )
            )
            tokenizer.stop()
    finally:
        for proc in procs:
            proc.stop()
    return rows


async def _not_serving(proc: Proc, service: str) -> bool:
    return await health(proc.target, service) != SERVING


async def _serving(proc: Proc, service: str) -> bool:
    return await health(proc.target, service) == SERVING


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=Path,
        default=REPO / ".cache" / "demo-model",
        help="checkpoint (default: the demo model, written once if absent)",
    )
    p.add_argument("--streams", type=int, default=1000, help="streams opened at once through the tokenizer")
    p.add_argument("--burst", type=int, default=3000, help="Generate calls opened at once")
    p.add_argument("--max-waiting", type=int, default=64, help="the burst's --max-waiting-requests")
    p.add_argument("--fuzz", type=int, default=1000, help="fuzzed requests")
    p.add_argument("--seed", type=int, default=2, help="fuzzer seed")
    p.add_argument("--grace", type=float, default=2.0, help="--grace-period of the SIGTERM runs")
    args = p.parse_args()
    if not (args.model / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "qwen3.testing.make_checkpoint",
                "--preset",
                "demo",
                "--out",
                str(args.model),
                "--skip-if-exists",
            ],
            cwd=REPO,
            check=True,
        )
    with tempfile.TemporaryDirectory(prefix="reliability-") as logs:
        rows = asyncio.run(measure(args, Path(logs)))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"\n{time.strftime('%Y-%m-%d')}, commit {commit}, `{' '.join(['python', *sys.argv])}`, "
        f"{os.cpu_count()} CPUs, demo model\n"
    )
    print("| measured | result |\n| --- | --- |")
    for name, result in rows:
        print(f"| {name} | {result} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
