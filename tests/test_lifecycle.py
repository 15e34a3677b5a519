"""Lifecycle of the real processes (issue 11): SIGTERM drains (running streams end ABORTED after the
grace period, exit 0, no traceback), Ctrl-C is a shutdown and not an engine death, an engine death
makes the server exit 1, a port in use is one line, and ``make serve``'s supervisor stops both."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import REPO, free_port

from engine_service.server import SERVICE_NAME as ENGINE_SERVICE
from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tokenizer_service.server import SERVICE_NAME as TOKENIZER_SERVICE

ENV = {**os.environ, "GRPC_VERBOSITY": "ERROR"}


class Proc:
    """A service process whose stderr goes to a file (read as JSON log records while it runs)."""

    def __init__(self, args: list[str], log: Path, **popen) -> None:
        self.log = log
        with open(log, "w") as err:
            self.popen = subprocess.Popen(
                args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=ENV, **popen
            )

    def text(self) -> str:
        return self.log.read_text()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.text().splitlines() if line.startswith("{")]

    def wait_record(self, msg: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.records() if r["msg"] == msg]
            if found:
                return found[0]
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {msg!r} record; log:\n{self.text()[-3000:]}")

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the process and every descendant (a failed test must not leave services running: the
        supervisor puts each service in its own process group, so killing its group would miss them)."""
        descendants = descendant_pids(self.popen.pid) if self.popen.poll() is None else []
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def descendant_pids(root: int) -> list[int]:
    """Every live descendant of ``root`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def engine_cli(model: Path, log: Path, *options: str, **popen) -> Proc:
    return Proc(
        [
            sys.executable,
            "-m",
            "engine_service",
            "--model",
            str(model),
            "--device",
            "cpu",
            "--log-format",
            "json",
            *options,
        ],
        log,
        **popen,
    )


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def long_generate(request_id: str) -> engine_pb2.GenerateRequest:
    # One sequence at a time (--max-num-seqs 1) and ~1,900 tokens each: these streams outlive a 1 s grace.
    return engine_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=[1, 2, 3],
        sampling_params=engine_pb2.SamplingParams(temperature=0, max_tokens=1900, ignore_eos=True),
    )


def serving_engine(
    tiny_checkpoint: Path, tmp_path: Path, procs: list[Proc], *options: str, **popen
) -> tuple[Proc, str]:
    port = free_port()
    proc = engine_cli(
        tiny_checkpoint,
        tmp_path / "engine.log",
        "--port",
        str(port),
        "--num-kv-blocks",
        "128",
        "--max-num-seqs",
        "1",
        *options,
        **popen,
    )
    procs.append(proc)
    proc.wait_record("serving")
    return proc, f"127.0.0.1:{port}"


def assert_clean(proc: Proc) -> None:
    text = proc.text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert not [r for r in proc.records() if r["level"] == "error"], text[-3000:]


def test_sigterm_drains_then_ends_running_streams_aborted(
    tiny_checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    proc, target = serving_engine(tiny_checkpoint, tmp_path, procs, "--grace-period", "1")
    with grpc.insecure_channel(target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=ENGINE_SERVICE))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        streams = [stub.Generate(long_generate(f"r{i}"), timeout=60) for i in range(3)]  # one runs, two wait
        assert next(streams[0]).token_ids
        proc.popen.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # at once
        with grpc.insecure_channel(target) as fresh, pytest.raises(grpc.RpcError) as refused:
            list(engine_pb2_grpc.EngineServiceStub(fresh).Generate(long_generate("late"), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        started = time.monotonic()
        for call in streams:
            responses = list(call)  # the rest of each stream: tokens during the grace period, then the end
            assert responses[-1].finish_reason == engine_pb2.FINISH_REASON_ABORTED
            assert call.code() == grpc.StatusCode.OK
        assert time.monotonic() - started < 8
    assert proc.wait(timeout=30) == 0
    assert_clean(proc)
    assert any(r["msg"] == "grace period over: aborting the streams still running" for r in proc.records())


def test_ctrl_c_on_the_process_group_is_a_shutdown_not_an_engine_death(
    tiny_checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    """A terminal's Ctrl-C reaches the server and its engine process alike; the engine must not die of it."""
    proc, _target = serving_engine(tiny_checkpoint, tmp_path, procs, "--grace-period", "1", start_new_session=True)
    os.killpg(proc.popen.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert_clean(proc)
    assert not any(r["msg"].startswith("engine died") for r in proc.records())


def engine_child_pid(server_pid: int) -> int:
    children = [
        int(pid)
        for task in Path(f"/proc/{server_pid}/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    engines = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(engines) == 1, children
    return engines[0]


def test_engine_death_fails_streams_unavailable_and_exits_nonzero(
    tiny_checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    proc, target = serving_engine(tiny_checkpoint, tmp_path, procs)
    with grpc.insecure_channel(target) as channel:
        call = engine_pb2_grpc.EngineServiceStub(channel).Generate(long_generate("doomed"), timeout=60)
        assert next(call).token_ids
        os.kill(engine_child_pid(proc.popen.pid), signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as failed:
            list(call)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert proc.wait(timeout=30) == 1  # a supervisor restarts it; up and NOT_SERVING forever helped no one
    records = proc.records()
    assert any(r["msg"] == "engine died; health NOT_SERVING" for r in records)
    assert "Traceback" not in proc.text()


@pytest.mark.parametrize("service", ["engine_service", "tokenizer_service"])
def test_port_in_use_is_one_clear_line(service: str, demo_checkpoint: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = ["--device", "cpu"] if service == "engine_service" else ["--engine", "127.0.0.1:1"]
        result = subprocess.run(
            [sys.executable, "-m", service, "--model", str(demo_checkpoint), "--port", str(port), *extra],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "level=info" not in line]
    assert errors == [f"error: cannot listen on 127.0.0.1:{port}: address already in use"], result.stderr


def test_tokenizer_sigterm_ends_its_running_streams_aborted(
    demo_checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    engine_port, port = free_port(), free_port()
    procs.append(
        engine_cli(demo_checkpoint, tmp_path / "engine.log", "--port", str(engine_port), "--num-kv-blocks", "256")
    )
    tokenizer = Proc(
        [
            sys.executable,
            "-m",
            "tokenizer_service",
            "--model",
            str(demo_checkpoint),
            "--engine",
            f"127.0.0.1:{engine_port}",
            "--port",
            str(port),
            "--engine-probe-interval",
            "0.2",
            "--grace-period",
            "1",
            "--log-format",
            "json",
        ],
        tmp_path / "tokenizer.log",
    )
    procs.append(tokenizer)
    wait_serving(f"127.0.0.1:{port}", TOKENIZER_SERVICE)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = tokenizer_pb2_grpc.TokenizerServiceStub(channel).Complete(
            tokenizer_pb2.CompleteRequest(
                prompt="Once upon a time", sampling_params=engine_pb2.SamplingParams(max_tokens=3000, ignore_eos=True)
            ),
            timeout=60,
        )
        assert next(call).text
        tokenizer.popen.send_signal(signal.SIGTERM)
        responses = list(call)
        assert responses[-1].finish_reason == engine_pb2.FINISH_REASON_ABORTED
        assert call.code() == grpc.StatusCode.OK
    assert tokenizer.wait(timeout=30) == 0
    assert_clean(tokenizer)


def supervisor(model: Path, tmp_path: Path, engine_args: str = "") -> tuple[Proc, int, int]:
    engine_port, port = free_port(), free_port()
    proc = Proc(
        [
            sys.executable,
            "scripts/serve.py",
            "--model",
            str(model),
            "--engine-port",
            str(engine_port),
            "--tokenizer-port",
            str(port),
            "--engine-args",
            f"--device cpu --num-kv-blocks 64 {engine_args}",
            "--tokenizer-args",
            "--engine-probe-interval 0.2",
        ],
        tmp_path / "serve.log",
        start_new_session=True,
    )
    return proc, engine_port, port


def wait_serving(target: str, service: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        while time.monotonic() < deadline:
            try:
                if (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                    .status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"{target} not SERVING within {timeout} s")


def pids_of(proc: Proc) -> list[int]:
    line = next(line for line in proc.text().splitlines() if line.startswith("serve: engine pid"))
    words = line.split()
    return [int(words[3].rstrip(",")), int(words[8])]  # "serve: engine pid N on :P, tokenizer pid M on :Q; ..."


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_supervisor_ctrl_c_stops_both_cleanly(demo_checkpoint: Path, tmp_path: Path, procs: list[Proc]) -> None:
    proc, _engine_port, port = supervisor(demo_checkpoint, tmp_path)
    procs.append(proc)
    wait_serving(f"127.0.0.1:{port}", TOKENIZER_SERVICE)
    children = pids_of(proc)
    os.killpg(proc.popen.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to `make serve`'s group
    assert proc.wait(timeout=60) == 0, proc.text()[-3000:]
    assert not any(alive(pid) for pid in children)
    text = proc.text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text and "level=error" not in text, text[-3000:]


def test_supervisor_stops_the_other_when_one_dies_and_passes_options(
    demo_checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    proc, _, _ = supervisor(demo_checkpoint, tmp_path, engine_args="--max-num-seqs 0")  # the engine refuses it
    procs.append(proc)
    assert proc.wait(timeout=60) == 1
    text = proc.text()
    assert "error: max_num_seqs" in text  # ENGINE_ARGS reached the engine
    assert "the engine service exited with code 2; stopping the other" in text
    assert not any(alive(pid) for pid in pids_of(proc))


def test_make_serve_stops_both_on_sigterm_to_make_alone(
    demo_checkpoint: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    engine_port, port = free_port(), free_port()
    # -o: take the installed venv and generated code as up to date (this test runs inside them).
    make = Proc(
        [
            "make",
            "-s",
            "-o",
            ".venv/.installed",
            "-o",
            "qwen3serve/__init__.py",
            "serve",
            f"MODEL={demo_checkpoint}",
            f"ENGINE_PORT={engine_port}",
            f"TOKENIZER_PORT={port}",
            f"PY={sys.executable}",
            "ENGINE_ARGS=--device cpu --num-kv-blocks 64",
        ],
        tmp_path / "make.log",
        start_new_session=True,
    )
    procs.append(make)
    wait_serving(f"127.0.0.1:{port}", TOKENIZER_SERVICE)
    children = pids_of(make)
    make.popen.send_signal(signal.SIGTERM)  # to make alone, not its process group
    make.wait(timeout=60)
    assert not any(alive(pid) for pid in children), make.text()[-3000:]
    assert "serve: stopped" in make.text()
    assert "Traceback" not in make.text()
