"""A cluster on one machine: N engine replicas and the SMG gateway in front (``make serve-cluster REPLICAS=2``).

    python -m engine_service.cluster --model /path/to/Qwen3-8B --replicas 2 --http-port 30000

Each replica is ``python -m engine_service`` on its own port (one GPU each when there are several:
``CUDA_VISIBLE_DEVICES``); ``smg`` (the ``gateway`` extra) is started once every replica answers SERVING on
``grpc.health.v1``, because SMG re-checks a worker missing at its start only every
``--worker-startup-check-interval`` seconds. SMG serves OpenAI HTTP on ``--http-port`` and Prometheus metrics
on ``--prometheus-port``, routes with ``cache_aware`` (fed by the replicas' KV events) and parses Qwen3's
reasoning and tool calls. Ctrl-C / SIGTERM stops everything. Torch-free.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass
class ClusterConfig:
    model: str
    replicas: int = 2
    first_engine_port: int = 50061
    http_port: int = 30000
    prometheus_port: int = 29000
    host: str = "127.0.0.1"
    served_model_name: str | None = None
    gpus: int = 0  # > 0: replica i gets CUDA_VISIBLE_DEVICES=i % gpus
    engine_args: list[str] = field(default_factory=list)  # passed on to every replica
    smg_args: list[str] = field(default_factory=list)  # passed on to smg

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if not Path(self.model).is_dir():
            raise ValueError(f"model must be a checkpoint folder, got {self.model!r}")

    def engine_port(self, i: int) -> int:
        return self.first_engine_port + i

    def engine_command(self, i: int) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "engine_service",
            "--model",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.engine_port(i)),
        ]
        if self.served_model_name:
            command += ["--served-model-name", self.served_model_name]
        return command + self.engine_args

    def smg_command(self) -> list[str]:
        smg = shutil.which("smg") or str(Path(sys.executable).with_name("smg"))
        return [
            smg,
            "launch",
            "--host",
            self.host,
            "--port",
            str(self.http_port),
            "--worker-urls",
            *(f"grpc://{self.host}:{self.engine_port(i)}" for i in range(self.replicas)),
            "--policy",
            "cache_aware",
            "--model-path",
            str(Path(self.model).resolve()),
            "--reasoning-parser",
            "qwen3",
            "--tool-call-parser",
            "qwen",
            "--prometheus-host",
            self.host,
            "--prometheus-port",
            str(self.prometheus_port),
            "--worker-startup-check-interval",
            "1",
            *self.smg_args,
        ]


def wait_serving(address: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until ``address`` answers SERVING on grpc.health.v1; RuntimeError if ``process`` exits or the
    time runs out."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)  # its stubs (types-grpcio-health-checking) omit the methods
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the replica at {address} exited with code {process.returncode}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status  # type: ignore[attr-defined]
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass  # not listening yet, or loading
            time.sleep(0.2)
    raise RuntimeError(f"{address} did not answer SERVING within {timeout_s:.0f} s")


def start_replica(config: ClusterConfig, i: int, **popen: Any) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if config.gpus > 0:
        env["CUDA_VISIBLE_DEVICES"] = str(i % config.gpus)
    return subprocess.Popen(config.engine_command(i), env=env, **popen)


def stop_all(processes: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    """SIGTERM each (the engine's graceful shutdown), then SIGKILL what is left after ``grace_s``."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _count_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine_service.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (served by every replica)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--first-engine-port", type=int, default=50061, help="replica i listens on this + i")
    p.add_argument("--http-port", type=int, default=30000, help="SMG's OpenAI HTTP port")
    p.add_argument("--prometheus-port", type=int, default=29000, help="SMG's Prometheus metrics port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--load-timeout", type=float, default=600.0, help="seconds for each replica to load")
    p.add_argument("--engine-arg", action="append", default=[], help="extra option for every replica (repeat)")
    p.add_argument("--smg-arg", action="append", default=[], help="extra option for smg (repeat)")
    args = p.parse_args(argv)
    config = ClusterConfig(
        args.model,
        args.replicas,
        args.first_engine_port,
        args.http_port,
        args.prometheus_port,
        args.host,
        args.served_model_name,
        _count_gpus(),
        args.engine_arg,
        args.smg_arg,
    )
    processes = [start_replica(config, i) for i in range(config.replicas)]
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the cluster as Ctrl-C does
    try:
        for i, process in enumerate(processes):
            wait_serving(f"{config.host}:{config.engine_port(i)}", args.load_timeout, process)
        gateway = subprocess.Popen(config.smg_command())
        processes.append(gateway)
        print(
            f"OpenAI API at http://{config.host}:{config.http_port}/v1, metrics at "
            f"http://{config.host}:{config.prometheus_port}/metrics",
            flush=True,
        )
        return gateway.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all(processes)


if __name__ == "__main__":
    raise SystemExit(main())
