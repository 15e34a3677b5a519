"""``python -m tokenizer_service`` as a real process: starts, answers health (NOT_SERVING: its engine
is down), exposes metrics, and exits cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import REPO, free_port

from tokenizer_service.server import SERVICE_NAME


def test_cli_serves_and_stops_on_sigterm(demo_checkpoint: Path) -> None:
    metrics_port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenizer_service",
            "--model",
            str(demo_checkpoint),
            "--engine",
            f"127.0.0.1:{free_port()}",
            "--port",
            "0",
            "--metrics-port",
            str(metrics_port),
            "--engine-probe-interval",
            "0.2",
            "--log-format",
            "json",
            "--grace",
            "1",
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
    )
    try:
        port = None
        lines = []
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            record = json.loads(line)
            if record["msg"] == "tokenizer service listening":
                port = int(record["address"].rsplit(":", 1)[1])
        assert port, "".join(lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
            )
        assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no engine behind it
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "# TYPE qwen3serve_rpc_requests_total counter" in body

        # The first engine probe logs the change; under load it can come after the checks above, so wait for
        # it (bounded by the test timeout) before stopping the service.
        def health_logged() -> bool:
            return any('"engine health changed"' in line and '"serving": false' in line for line in lines)

        while not health_logged() and time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        lines += proc.stderr.read().splitlines()  # type: ignore[union-attr]
        records = [json.loads(line) for line in lines if line.strip()]
        assert any(r["msg"] == "engine health changed" and r["serving"] is False for r in records)
        assert any(r["msg"] == "shutting down" and r["signal"] == "SIGTERM" for r in records)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
