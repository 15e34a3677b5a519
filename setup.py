"""Generates the gRPC code from protos/ whenever the package is built or installed (``pip install .``,
``pip install -e .``, wheels), so installed copies always carry it; ``make proto-gen`` calls the same
function for a checkout. Everything else about the package is in pyproject.toml."""

from __future__ import annotations

import pathlib

from setuptools import setup

ROOT = pathlib.Path(__file__).resolve().parent


def generate_grpc_code() -> None:
    """protos/**/*.proto -> qwen3serve/**/{*_pb2.py, *_pb2.pyi, *_pb2_grpc.py} (+ package __init__ files)."""
    protos = sorted(str(p) for p in (ROOT / "protos").rglob("*.proto"))
    if not protos:  # an sdist-built wheel: the generated code is already in the tree
        return
    from grpc_tools import protoc  # a build requirement (pyproject.toml [build-system])

    include = str(pathlib.Path(protoc.__file__).parent / "_proto")  # well-known types
    args = ["grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--python_out={ROOT}",
            f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"grpc_tools.protoc failed on {protos}")
    package = ROOT / "qwen3serve"
    for directory in [package, *(d for d in package.rglob("*") if d.is_dir() and d.name != "__pycache__")]:
        (directory / "__init__.py").touch()


if __name__ == "__main__":  # how setuptools' build backend runs this file
    generate_grpc_code()  # before setuptools discovers packages, so qwen3serve/ is part of every build
    setup()
