"""The servers ``bench/reliability.py`` measures: subprocesses of ``python -m engine_service`` / ``tokenizer_service``
on the demo model, their health, and waiting for a state (bounded in time)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # serving.py, fuzzer.py
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from serving import free_port  # noqa: E402

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc  # noqa: E402

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


async def exit_status(proc: Proc, within: float) -> str:
    for _ in range(int(within / 0.1)):
        if proc.popen.poll() is not None:
            return f"exited {proc.popen.returncode}"
        await asyncio.sleep(0.1)
    return f"still running after {within:.0f} s"


async def is_not_serving(proc: Proc, service: str) -> bool:
    return await health(proc.target, service) != SERVING


async def is_serving(proc: Proc, service: str) -> bool:
    return await health(proc.target, service) == SERVING
