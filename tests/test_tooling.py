"""`make lint` and pre-commit run the same tools at the same versions: the pins in pyproject.toml's test extra
and the Makefile's BUF_VERSION are the ones .pre-commit-config.yaml names."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_pre_commit_pins_match_make_lint() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    pre_commit = (ROOT / ".pre-commit-config.yaml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    ruff_pin = re.search(r'"ruff==([^"]+)"', pyproject)
    assert ruff_pin, "ruff is pinned exactly in the test extra"
    assert re.search(r'"mypy==[^"]+"', pyproject), "mypy is pinned exactly in the test extra"
    hook_pins = re.findall(r'"ruff==([^"]+)"', pre_commit)
    assert hook_pins and set(hook_pins) == {ruff_pin.group(1)}, (hook_pins, ruff_pin.group(1))
    assert ".venv/bin/python -m mypy" in pre_commit  # the project's environment: the pinned mypy and its stubs
    buf = re.search(r"^BUF_VERSION \?= (\S+)$", makefile, re.M)
    assert buf and f"@bufbuild/buf@{buf.group(1)} lint" in pre_commit, "buf at the Makefile's BUF_VERSION"


def test_grpc_code_is_generated_with_typed_stubs() -> None:
    """mypy checks calls into the generated gRPC code through mypy-protobuf's stubs: pinned at one version as a
    build requirement (pip install) and in the test extra (make proto-gen), and present in this install."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    requires = re.search(r"^requires = \[(.*)\]", pyproject, re.M)
    assert requires, "the [build-system] requires line"
    build = re.findall(r'"(mypy-protobuf==[^"]+)"', requires.group(1))
    test = re.findall(r'^\s+"(mypy-protobuf==[^"]+)",', pyproject, re.M)
    assert len(build) == 1 and build == test, (build, test)
    stub = ROOT / "qwen3serve" / "engine" / "v1" / "engine_pb2_grpc.pyi"
    assert stub.is_file(), "make install / make proto-gen writes the *_pb2_grpc.pyi stubs"
    assert "class EngineServiceAsyncStub" in stub.read_text()
    assert (ROOT / "qwen3serve" / "smg" / "vllm_engine_pb2_grpc.pyi").is_file()


def test_generation_without_mypy_protobuf_writes_protocs_own_stubs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that only runs the code (the GPU host's `make proto-gen PY=python3`) lacks the plugins:
    generation still works, with protoc's .pyi for the messages instead of failing."""
    sys.path.insert(0, str(ROOT))
    try:
        import setup
    finally:
        sys.path.remove(str(ROOT))
    monkeypatch.setattr(setup.sys, "executable", "/nonexistent/python")
    monkeypatch.setattr(setup.shutil, "which", lambda name: None)
    assert setup._mypy_protobuf_plugins() == []
    monkeypatch.undo()
    found = setup._mypy_protobuf_plugins()
    assert any(arg.startswith("--mypy_grpc_out=") for arg in found), found
