"""deploy/kubernetes/ against the Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors),
and the engine arguments in it against the engine's own command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

MANIFESTS = sorted((Path(__file__).resolve().parent.parent / "deploy" / "kubernetes").glob("*.yaml"))


def engine_options() -> list[str]:
    """The engine CLI's options, from its --help."""
    out = subprocess.run(
        [sys.executable, "-m", "engine_service", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [word.rstrip(",") for word in out.split() if word.startswith("--")]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(manifest: Path) -> None:
    validate = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run(
        [str(validate), "--strict", "--kubernetes-version", "1.33.0", str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_engine_probes_and_arguments() -> None:
    docs = list(yaml.safe_load_all((MANIFESTS[0].parent / "engine.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051  # grpc.health.v1, served without the API key
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Every option the manifest passes exists (the Dockerfile's entrypoint adds --host/--port/--metrics-port);
    # parsing them for real would read the certificate files, which exist only in the pod.
    options = {a for a in container["args"] if a.startswith("--")}
    known = set(engine_options())
    assert options <= known, options - known
    smg = next(
        d for d in yaml.safe_load_all((MANIFESTS[0].parent / "smg.yaml").read_text()) if d["kind"] == "Deployment"
    )
    command = smg["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "--selector app.kubernetes.io/name=qwen3-engine" in command
    assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "qwen3-engine"
