"""What the bench scripts share: their command line's start, the offline engine's options, how a result is recorded."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose --help shows the script's docstring as written (it explains what is measured)."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_engine_options(parser: argparse.ArgumentParser, *, max_model_len: int | None = None) -> None:
    """How the offline engine runs (--device, --dtype, --attention-backend, --enforce-eager,
    --no-async-scheduling, defaulting to the engine's own defaults) and, given ``max_model_len`` (the
    --max-model-len default), its batch and KV sizes (--max-num-seqs, --max-model-len, --kv-block-size,
    --num-kv-blocks); read back by ``engine_options``."""
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--no-async-scheduling", action="store_true", help="wait for each step (no overlap)")
    if max_model_len is not None:
        parser.add_argument("--max-num-seqs", type=int, default=256)
        parser.add_argument("--max-model-len", type=int, default=max_model_len)
        parser.add_argument("--kv-block-size", type=int, default=256)
        parser.add_argument("--num-kv-blocks", type=int, default=None, help="fixed KV pool (default: from memory)")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """``LLM`` keyword arguments from ``add_engine_options``'s options (the sizes where it declared them;
    ``num_kv_blocks`` only when given)."""
    options: dict[str, Any] = dict(
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        async_scheduling=False if args.no_async_scheduling else None,  # None: the engine's choice
    )
    if "max_model_len" in vars(args):
        options.update(
            max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, kv_block_size=args.kv_block_size
        )
        if args.num_kv_blocks:
            options["num_kv_blocks"] = args.num_kv_blocks
    return options


def sync(device: str) -> None:
    """Wait for the GPU's queued work before reading a clock (nothing to wait for on CPU)."""
    import torch  # here, not above: the service benches import this module without torch

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


def append_results(path: Path | None, *records: dict[str, Any]) -> None:
    """Append each record to ``path`` (when given) as one JSON line, dated, so runs accumulate in one file."""
    if path is None:
        return
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps({**record, "date": time.strftime("%Y-%m-%d")}) + "\n")
