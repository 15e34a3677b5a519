"""``python -m engine_service --help`` and ``python -m tokenizer_service --help``: answered without importing
torch (the service side is torch-free; the engine core loads only when serving), and every option listed once,
with a description and its default."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ["engine_service", "tokenizer_service"]


def _help(service: str) -> tuple[str, set[str]]:
    """The --help text (one line per option: a wide terminal) and the modules imported to print it."""
    env = {**os.environ, "COLUMNS": "1000", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", service, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # -X importtime writes "import time: self | cumulative | module" lines to stderr, one per module imported.
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    modules.discard("imported package")  # the header line
    return proc.stdout, modules


def _options(help_text: str) -> list[tuple[list[str], str]]:
    """(option strings, description) per entry of the help's option sections."""
    entries: list[tuple[list[str], str]] = []
    for line in help_text.splitlines():
        match = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if match:
            # "--opt METAVAR, --no-opt" or "-h, --help": the option strings are the words starting with "-".
            names = [w.rstrip(",") for w in match.group(1).split() if w.startswith("-")]
            entries.append((names, (match.group(2) or "").strip()))
        elif entries and line.startswith(" " * 4) and line.strip():  # a description on the next line
            names, description = entries[-1]
            entries[-1] = (names, f"{description} {line.strip()}".strip())
    return entries


@pytest.mark.parametrize("service", SERVICES)
def test_help_imports_no_torch(service: str) -> None:
    help_text, modules = _help(service)
    assert "--help" in help_text
    assert "grpc" in modules, "the import-time trace was not read (no grpc among the modules)"
    heavy = sorted(m for m in modules if m.split(".")[0] in {"torch", "triton", "transformers"})
    assert not heavy, f"`python -m {service} --help` imports {heavy[:10]}"


@pytest.mark.parametrize("service", SERVICES)
def test_help_lists_each_option_once_with_description_and_default(service: str) -> None:
    help_text, _ = _help(service)
    entries = [(names, text) for names, text in _options(help_text) if "--help" not in names]
    assert len(entries) > 10, help_text
    names = [n for entry_names, _ in entries for n in entry_names]
    assert len(names) == len(set(names)), f"options listed twice: {sorted({n for n in names if names.count(n) > 1})}"
    undescribed = [entry_names[0] for entry_names, text in entries if not text]
    assert not undescribed, f"options without a description: {undescribed}"
    # Required options stand outside [...] in the usage line; they have no default to state.
    usage = re.sub(r"\[[^\]]*\]", "", help_text.split("\n\n", 1)[0])
    required = set(re.findall(r"(--[\w-]+)", usage))
    assert required, usage
    wrong = {
        entry_names[0]: text
        for entry_names, text in entries
        if entry_names[0] not in required and text.count("(default:") != 1
    }
    assert not wrong, f"options whose help does not state the default exactly once: {wrong}"


def _descriptions(help_text: str) -> dict[str, str]:
    return {names[0]: text for names, text in _options(help_text) if "--help" not in names}


def test_shared_options_are_defined_once_for_both_services() -> None:
    """The options both CLIs take come from service_common/options.py: the same names, the same help (the port's
    default and the limited RPCs aside), so a change to one reaches both."""
    engine = _descriptions(_help("engine_service")[0])
    tokenizer = _descriptions(_help("tokenizer_service")[0])
    same = ["--host", "--metrics-port", "--grace-period", "--log-level", "--log-format", "--tls-cert", "--api-key"]
    for option in same:
        assert option in engine and option in tokenizer, option
        assert engine[option] == tokenizer[option], (option, engine[option], tokenizer[option])
    assert "(default: 50051)" in engine["--port"] and "(default: 50052)" in tokenizer["--port"]
    # Each service's request limits are one group, built from its RequestLimits dataclass.
    assert "--max-request-id-bytes" in engine and "--max-request-id-bytes" in tokenizer


def test_serve_script_takes_the_services_defaults() -> None:
    """`make serve`'s supervisor: its --model and default ports are the services' (no second copy)."""
    env = {**os.environ, "COLUMNS": "1000", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "scripts/serve.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    options = _descriptions(proc.stdout)
    assert "(default: 50051)" in options["--engine-port"], options
    assert "(default: 50052)" in options["--tokenizer-port"], options
    for help_text in (proc.stdout, _help("engine_service")[0], _help("tokenizer_service")[0]):
        assert _descriptions(help_text)["--model"].startswith("checkpoint directory: "), help_text
