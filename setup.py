"""Generates the gRPC code from protos/ whenever the package is built or installed (``pip install .``,
``pip install -e .``, wheels), so installed copies always carry it; ``make proto-gen`` calls the same
function for a checkout. Everything else about the package is in pyproject.toml.

Besides our own protos it generates SMG's worker contract, ``vllm.grpc.engine.VllmEngine``, from the .proto
files inside the pinned ``smg-grpc-proto`` package (a build requirement), into ``qwen3serve/smg/``. The package
ships generated modules too, but those are locked to the grpcio-tools that made them; generating here keeps them
in step with the grpcio this install runs (the GPU machine's is older).

Typed stubs for mypy come from mypy-protobuf's ``protoc-gen-mypy`` / ``protoc-gen-mypy_grpc`` plugins (a build
requirement, and in the test extra for ``make proto-gen``); where they are missing, protoc's own ``.pyi`` are
written and the gRPC modules stay untyped, which is enough to run the code."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import sys
import tempfile

from setuptools import setup

ROOT = pathlib.Path(__file__).resolve().parent


#: SMG's protos used here, and the Python package they are generated into (mirrored as their path for protoc).
SMG_PROTOS = ("common.proto", "vllm_engine.proto")
SMG_PACKAGE = "qwen3serve/smg"


def _mypy_protobuf_plugins() -> list[str]:
    """protoc arguments that write typed stubs with mypy-protobuf's plugins: ``*_pb2.pyi`` (messages) and
    ``*_pb2_grpc.pyi`` (stubs, servicers), so mypy checks the code that calls them. Empty when the plugins are
    not installed (a machine that only runs the code, e.g. ``make proto-gen PY=python3`` on a GPU host):
    protoc's own ``.pyi`` then describe the messages, and nothing types the gRPC modules."""
    found = {}
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        beside = pathlib.Path(sys.executable).parent / name  # a venv's bin/, or pip's isolated build env
        path = str(beside) if beside.is_file() else shutil.which(name)
        if path is None:
            print(
                f"setup.py: {name} not found (pip install mypy-protobuf): writing untyped gRPC modules", file=sys.stderr
            )
            return []
        found[name] = path
    return [
        f"--plugin=protoc-gen-mypy={found['protoc-gen-mypy']}",
        f"--plugin=protoc-gen-mypy_grpc={found['protoc-gen-mypy_grpc']}",
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
    ]


def _protoc(include_dirs: list[str], protos: list[str]) -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml [build-system])

    include = str(pathlib.Path(protoc.__file__).parent / "_proto")  # well-known types
    stubs = _mypy_protobuf_plugins() or [f"--pyi_out={ROOT}"]
    args = [
        "grpc_tools.protoc",
        *(f"-I{d}" for d in include_dirs),
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *stubs,
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"grpc_tools.protoc failed on {protos}")


def smg_proto_dir() -> pathlib.Path:
    """The .proto folder of the installed smg-grpc-proto package (found without importing it)."""
    spec = importlib.util.find_spec("smg_grpc_proto")
    if spec is None or spec.origin is None:
        raise SystemExit("smg-grpc-proto is not installed: it is a build requirement (pyproject.toml)")
    folder = pathlib.Path(spec.origin).parent / "proto"
    missing = [name for name in SMG_PROTOS if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"smg-grpc-proto at {folder} lacks {missing}: check its pinned version")
    return folder


def generate_smg_code() -> None:
    """smg_grpc_proto/proto/{common,vllm_engine}.proto -> qwen3serve/smg/*_pb2*.py.

    The package's protos import each other by bare file name (``import "common.proto"``), which protoc turns
    into a top-level ``import common_pb2``. They are placed under ``qwen3serve/smg/`` in a scratch folder,
    with those imports given that path, so the code imports ``qwen3serve.smg.common_pb2``. Nothing else
    changes: proto packages, and so the service's wire name ``vllm.grpc.engine.VllmEngine``, stay as shipped.
    """
    source = smg_proto_dir()
    with tempfile.TemporaryDirectory() as scratch:
        target = pathlib.Path(scratch) / SMG_PACKAGE
        target.mkdir(parents=True)
        for name in SMG_PROTOS:
            text = (source / name).read_text(encoding="utf-8")
            for other in SMG_PROTOS:
                text = text.replace(f'import "{other}";', f'import "{SMG_PACKAGE}/{other}";')
            (target / name).write_text(text, encoding="utf-8")
        _protoc([scratch], [str(target / name) for name in SMG_PROTOS])


def generate_grpc_code() -> None:
    """protos/**/*.proto -> qwen3serve/**/{*_pb2.py, *_pb2.pyi, *_pb2_grpc.py, *_pb2_grpc.pyi} (+ package
    __init__ files),
    and SMG's vLLM worker contract -> qwen3serve/smg/ (:func:`generate_smg_code`)."""
    protos = sorted(str(p) for p in (ROOT / "protos").rglob("*.proto"))
    if not protos:  # an sdist-built wheel: the generated code is already in the tree
        return
    _protoc([str(ROOT / "protos")], protos)
    generate_smg_code()
    package = ROOT / "qwen3serve"
    for directory in [package, *(d for d in package.rglob("*") if d.is_dir() and d.name != "__pycache__")]:
        (directory / "__init__.py").touch()


if __name__ == "__main__":  # how setuptools' build backend runs this file
    generate_grpc_code()  # before setuptools discovers packages, so qwen3serve/ is part of every build
    setup()
