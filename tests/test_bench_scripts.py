"""The benchmark scripts run end to end on a CPU with tiny settings and print their result lines.

GPU time is scarce (30 minutes a session): a benchmark that breaks is found here, not on the device.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: float = 240) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{args[0]} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


SMALL_WORKLOAD = [
    "--num-requests",
    "2",
    "--max-input",
    "110",
    "--max-output",
    "104",
    "--max-model-len",
    "512",
    "--kv-block-size",
    "16",
]


def test_throughput_script(demo_checkpoint: Path) -> None:
    out = run_script(
        "bench/throughput.py",
        "--model",
        str(demo_checkpoint),
        "--device",
        "cpu",
        "--num-kv-blocks",
        "32",
        "--min-output",
        "100",
        *SMALL_WORKLOAD,
    )
    tokens = re.search(r"qwen3-serve \(torch, sync steps\)\s+(\d+)\s+[\d.]+\s+[\d.]+", out)
    assert tokens and 200 <= int(tokens.group(1)) <= 208, out  # two requests of 100..104 tokens


def test_latency_script(demo_checkpoint: Path) -> None:
    out = run_script(
        "bench/latency.py",
        "--model",
        str(demo_checkpoint),
        "--device",
        "cpu",
        "--prompt-len",
        "16",
        "--output-len",
        "8",
        "--repeats",
        "1",
    )
    assert re.search(r"batch 1, prompt 16, 8 output tokens, torch, eager, torch element-wise ops", out), out
    assert re.search(r"decode: [\d.]+ ms/token", out), out


def test_host_overhead_script(tiny_checkpoint: Path) -> None:
    out = run_script("bench/host_overhead.py", "--model", str(tiny_checkpoint), "--num-seqs", "4", "--steps", "5")
    assert "4 running sequences, model stubbed" in out
    for piece in ("SamplingBatch.build", "ForwardBatch.build", "apply sampled tokens", "schedule"):
        assert re.search(rf"{re.escape(piece)}\s+[\d.]+ ms", out), (piece, out)


def test_service_throughput_script(demo_checkpoint: Path) -> None:
    out = run_script(
        "bench/service_throughput.py",
        "--model",
        str(demo_checkpoint),
        "--clients",
        "1",
        "--stream-interval",
        "3",
        *SMALL_WORKLOAD,
    )
    rows = dict(re.findall(r"^(offline LLM.generate|gRPC Generate x2 streams)\s+(\d+)", out, re.MULTILINE))
    assert rows.get("offline LLM.generate") == rows.get("gRPC Generate x2 streams") and rows, out
    assert re.search(r"service / offline: [\d.]+%", out), out
    assert re.search(r"KV blocks: offline LLM.generate (\d+), gRPC Generate x2 streams \1;", out), out
    assert re.search(r"server CPU per streamed token [\d.]+ us \(stream interval 3\)", out), out


def test_stream_overhead_script() -> None:
    out = run_script(
        "bench/stream_overhead.py",
        "--streams",
        "6",
        "--tokens",
        "9",
        "--rate",
        "3000",
        "--stream-intervals",
        "1",
        "4",
        "--clients",
        "1",
    )
    rows = re.findall(r"^\s+([14])\s+(\d+)\s+[\d.]+\s+\d+\s+[\d.]+\s+[\d.]+", out, re.MULTILINE)
    assert rows == [("1", "54"), ("4", "54")], out  # every token of every stream arrives at both intervals


def test_hf_comparison_needs_cuda(demo_checkpoint: Path) -> None:
    with pytest.raises(AssertionError, match="need a CUDA device"):
        run_script("bench/throughput.py", "--model", str(demo_checkpoint), "--device", "cpu", "--hf-only")
