"""``python -m engine_service`` as a real process (CPU, the tiny fp32 model): it listens at once, turns
SERVING once its engine process has loaded, streams the same greedy tokens as the offline engine, and
exits cleanly on SIGTERM; a checkpoint that fails to load, or a bad option, ends it with a message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import REPO, free_port

from engine_service import LLM, SamplingParams
from engine_service.server import SERVICE_NAME
from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc

PROMPT = [11, 22, 33, 44, 55]


def start(model: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine_service",
            "--model",
            str(model),
            "--device",
            "cpu",
            "--port",
            "0",
            "--num-kv-blocks",
            "64",
            "--log-format",
            "json",
            *options,
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
    )


def read_until(proc: subprocess.Popen, message: str, records: list[dict], timeout_s: float = 120) -> dict:
    """Read JSON log records from ``proc`` (appended to ``records``) until one says ``message``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        if not line:
            break
        if line.startswith("{"):
            records.append(json.loads(line))
            if records[-1]["msg"] == message:
                return records[-1]
    raise AssertionError(f"no {message!r} record; got {records}")


def test_cli_serves_streams_and_stops_on_sigterm(tiny_checkpoint: Path) -> None:
    metrics_port = free_port()
    proc = start(tiny_checkpoint, "--metrics-port", str(metrics_port), "--grace-period", "1")
    records: list[dict] = []
    try:
        listening = read_until(proc, "listening; loading the model", records)
        target = f"127.0.0.1:{int(listening['address'].rsplit(':', 1)[1])}"
        read_until(proc, "serving", records)
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            request = engine_pb2.GenerateRequest(
                request_id="cli",
                prompt_token_ids=PROMPT,
                sampling_params=engine_pb2.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
            )
            responses = list(engine_pb2_grpc.EngineServiceStub(channel).Generate(request, timeout=60))
        streamed = [t for r in responses for t in r.token_ids]
        assert responses[-1].finish_reason == engine_pb2.FINISH_REASON_LENGTH
        with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64) as llm:
            offline = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
        assert streamed == offline.token_ids
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'qwen3serve_generation_tokens_total{model_name="' in body

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        records += [
            json.loads(line)
            for line in proc.stderr.read().splitlines()  # type: ignore[union-attr]
            if line.startswith("{")
        ]
        assert any(r["msg"] == "shutting down" and r["signal"] == "SIGTERM" for r in records)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_exits_with_the_load_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = start(broken)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    failed = [json.loads(line) for line in stderr.splitlines() if '"engine failed to load: ' in line]
    assert failed and "model.safetensors is unreadable" in failed[0]["msg"]


@pytest.mark.parametrize(
    "option, value, field", [("--max-num-seqs", "0", "max_num_seqs"), ("--stream-interval", "0", "stream_interval")]
)
def test_cli_rejects_a_bad_option_before_listening(tiny_checkpoint: Path, option: str, value: str, field: str) -> None:
    proc = start(tiny_checkpoint, option, value)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"error: {field}" in stderr and "listening" not in stderr
