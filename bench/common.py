"""What the bench scripts share: their command line's start and how a result is recorded."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose --help shows the script's docstring as written (it explains what is measured)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def append_results(path: Path | None, *records: dict[str, Any]) -> None:
    """Append each record to ``path`` (when given) as one JSON line, dated, so runs accumulate in one file."""
    if path is None:
        return
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps({**record, "date": time.strftime("%Y-%m-%d")}) + "\n")
