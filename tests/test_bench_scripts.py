"""The benchmark scripts run end to end on a CPU with tiny settings and print their result lines.

GPU time is scarce (30 minutes a session): a benchmark that breaks is found here, not on the device.
"""

from __future__ import annotations

import json
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


def test_smg_throughput_script(demo_checkpoint: Path) -> None:
    """The real smg binary in front of one replica: both served paths stream every token of the workload
    (the script itself fails if SMG's prompt token counts differ from the ids the gRPC phase sent)."""
    out = run_script(
        "bench/smg_throughput.py",
        "--model",
        str(demo_checkpoint),
        "--clients",
        "1",
        "--skip-offline",
        "--paired-rounds",
        "1",
        "--paired-tokens",
        "12",
        *SMALL_WORKLOAD,
        "--max-input",  # smaller than SMALL_WORKLOAD's (the last value wins): two servers, two phases
        "40",
        "--max-output",
        "12",
        timeout=600,
    )
    rows = dict(re.findall(r"^(gRPC Generate|SMG /v1/completions) x2 streams\s+(\d+)", out, re.MULTILINE))
    assert rows.get("gRPC Generate") == rows.get("SMG /v1/completions") and rows, out
    assert re.search(r"SMG / gRPC: [\d.]+%", out), out
    assert re.search(r"SMG added latency per token: [+-][\d.]+ ms", out), out
    assert re.search(r"SMG added latency per token, paired streams: .* over \d+ tokens \([01] of 1 rounds", out), out


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


def test_load_sweep_and_its_plot(demo_checkpoint: Path, tmp_path: Path) -> None:
    sweep, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    out = run_script(
        "bench/load_sweep.py",
        "--model",
        str(demo_checkpoint),
        "--rates",
        "3",
        "6",
        "--duration",
        "0.5",
        "--min-requests",
        "2",
        "--clients",
        "1",
        "--min-input",
        "8",
        "--max-input",
        "12",
        "--min-output",
        "4",
        "--max-output",
        "6",
        "--max-model-len",
        "64",
        "--kv-block-size",
        "16",
        "--max-num-seqs",
        "8",
        "--json",
        str(sweep),
    )
    rows = json.loads(sweep.read_text())["rates"]
    assert [r["rate"] for r in rows] == [3, 6] and all(r["requests"] >= 2 for r in rows), out
    for r in rows:  # every request streamed all its tokens (4..6 each), and the latencies are ordered
        assert 4 * r["requests"] <= r["output_tokens"] <= 6 * r["requests"], r
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"], r
    assert re.search(r"^\s+6\s+\d+\s+[\d.]+", out, re.MULTILINE), out
    pytest.importorskip("matplotlib")
    assert "wrote" in run_script("bench/plot_sweep.py", str(sweep), str(png), "--title", "CPU smoke test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_structured_throughput_script(demo_checkpoint: Path) -> None:
    out = run_script(
        "bench/structured_throughput.py",
        "--model",
        str(demo_checkpoint),
        "--device",
        "cpu",
        "--num-requests",
        "2",
        "--min-input",
        "8",
        "--max-input",
        "16",
        "--output-len",
        "6",
        "--max-model-len",
        "256",
        "--kv-block-size",
        "16",
        "--num-kv-blocks",
        "32",
        "--fill-threads",
        "1",
        "--profile",
        "2:2",
    )
    for name in ("json_schema", "unconstrained"):  # the schema cannot complete in 6 tokens: both make 2 x 6
        assert re.search(rf"^{name}\s+12 tokens", out, re.M), out
    assert re.search(r"ratio \d+\.\d{3}; host bitmask fill \d+\.\d{2} ms/step", out), out
    assert re.search(r"profile: from step 2, \d+ running sequences: wall \d+\.\d+ ms/step", out), out
