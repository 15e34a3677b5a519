"""`make lint` and pre-commit run the same tools at the same versions: the pins in pyproject.toml's test extra
and the Makefile's BUF_VERSION are the ones .pre-commit-config.yaml names."""

from __future__ import annotations

import re
from pathlib import Path

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
