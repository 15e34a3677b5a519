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
from pathlib import Path

from reliability_servers import (  # first: puts the repository and tests/ on sys.path
    ENGINE,
    REPO,
    SERVING,
    TOKENIZER,
    exit_status,
    health,
    is_not_serving,
    is_serving,
    kv_empty,
    serving,
    start_engine,
    start_tokenizer,
    until,
)

# isort: split
from fuzzer import fuzz  # tests/fuzzer.py
from reliability_load import chat_call, fault, fmt, generate_call, open_streams


class Rows(list):
    """The table's rows; each is also printed when measured, so a run that fails later still shows it."""

    def add(self, name: str, result: str) -> None:
        print(f"| {name} | {result} |", flush=True)
        self.append((name, result))


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
        held = await open_streams(tokenizer.target, args.streams, chat_call(8))
        rows.add(
            "streams held concurrently",
            f"{args.streams} Chat streams opened at once through the tokenizer service (8 tokens each): "
            f"{fmt(held.statuses)}; finish {fmt(held.reasons)}; {held.seconds:.1f} s; "
            f"first message after {max(held.first, default=0):.1f} s at worst; {await kv_empty(engine)}",
        )

        # 2. Bad inputs: the fuzzer against both processes.
        tally = await fuzz(engine.target, tokenizer.target, args.fuzz, args.seed)
        print(tally.summary(), flush=True)
        per_status = Counter()
        for (_, _, status), n in tally.counts.items():
            per_status[status] += n
        rows.add(
            "bad inputs tried",
            f"{tally.total} fuzzed requests (seed {args.seed}; "
            f"{fmt(Counter(m for (_, m, _) in tally.counts.elements()))})"
            f": {fmt(per_status)}; {len(tally.findings)} outside the documented statuses "
            f"({fmt(Counter(f.status + ' ' + f.mode for f in tally.findings))}); both servers "
            f"{'SERVING' if await health(tokenizer.target, TOKENIZER) == SERVING else 'NOT SERVING'} after; "
            f"{await kv_empty(engine)}",
        )

        # 3. Tokenizer-engine link lost (engine server killed mid-stream), then the engine restarted.
        lost = await fault(lambda: open_streams(tokenizer.target, 20, chat_call(200)), lambda: engine.popen.kill(), 1.5)
        engine.popen.wait()
        down = await until(lambda: is_not_serving(tokenizer, TOKENIZER), 10, "tokenizer NOT_SERVING")
        restarted = time.perf_counter()
        engine = start_engine(model, logs, engine.port)
        procs.append(engine)
        await serving(engine, ENGINE)
        back = await until(lambda: is_serving(tokenizer, TOKENIZER), 30, "tokenizer SERVING again")
        after = (await open_streams(tokenizer.target, 5, chat_call(4))).statuses
        rows.add(
            "fault: tokenizer-engine link lost",
            f"engine server SIGKILLed under 20 Chat streams: {fmt(lost.statuses)}; tokenizer NOT_SERVING "
            f"{down:.2f} s later; engine restarted on its port (SERVING after "
            f"{time.perf_counter() - restarted - back:.1f} s): tokenizer SERVING {back:.2f} s after "
            f"that, then 5 Chats: {fmt(after)}",
        )

        # 4. The engine's own process killed mid-stream.
        child = engine.engine_child()
        killed = await fault(
            lambda: open_streams(engine.target, 20, generate_call(200)), lambda: os.kill(child, signal.SIGKILL), 1.5
        )
        down = await until(lambda: is_not_serving(engine, ENGINE), 10, "engine NOT_SERVING")
        chats = (await open_streams(tokenizer.target, 5, chat_call(4), timeout=10)).statuses
        rows.add(
            "fault: engine process killed mid-stream",
            f"engine child SIGKILLed under 20 Generate streams: {fmt(killed.statuses)}; "
            f"engine health NOT_SERVING after {down:.2f} s; new Chats: {fmt(chats)}; "
            f"engine server {await exit_status(engine, 10)}",
        )
        engine.stop()
        tokenizer.stop()

        # 5. A burst against a small waiting queue.
        engine = start_engine(model, logs, None, "--max-waiting-requests", str(args.max_waiting))
        procs.append(engine)
        await serving(engine, ENGINE)
        burst = await open_streams(engine.target, args.burst, generate_call(4))
        rows.add(
            "burst",
            f"{args.burst} Generate calls at once, --max-waiting-requests {args.max_waiting}: "
            f"{fmt(burst.statuses)} in {burst.seconds:.1f} s; {await kv_empty(engine)}",
        )

        # 6. SIGTERM mid-stream: the engine (Generate streams), then the tokenizer service (Chat streams).
        for name, make_calls in (
            ("engine", lambda e, t: open_streams(e.target, 20, generate_call(400))),
            ("tokenizer", lambda e, t: open_streams(t.target, 20, chat_call(400))),
        ):
            engine.stop()
            engine = start_engine(model, logs, None, "--grace-period", str(args.grace))
            tokenizer = start_tokenizer(model, engine, logs, "--grace-period", str(args.grace))
            procs += [engine, tokenizer]
            await serving(engine, ENGINE)
            await serving(tokenizer, TOKENIZER)
            target = engine if name == "engine" else tokenizer
            signalled = time.perf_counter()
            drained = await fault(
                lambda: make_calls(engine, tokenizer), lambda: target.popen.send_signal(signal.SIGTERM), 1.5
            )
            ended = time.perf_counter() - signalled + 1.5
            rows.add(
                f"fault: SIGTERM to the {name} mid-stream",
                f"--grace-period {args.grace}, 20 streams of 400 tokens: {fmt(drained.statuses)}; "
                f"last messages' finish {fmt(drained.reasons)}; streams over {ended - 1.5:.1f} s after the signal; "
                f"{name} server {await exit_status(target, args.grace + 10)}; traceback in its log: "
                f"{'yes' if 'Traceback' in target.log.read_text() else 'no'}",
            )
            tokenizer.stop()
    finally:
        for proc in procs:
            proc.stop()
    return rows


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
