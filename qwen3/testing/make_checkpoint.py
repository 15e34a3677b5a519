"""CLI: ``python -m qwen3.testing.make_checkpoint --preset qwen3-0.6b --out DIR [--dtype bfloat16]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen3.dtypes import DTYPE_NAMES, torch_dtype
from qwen3.testing.checkpoints import PRESETS, write_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a random-weight Qwen3 checkpoint with the real Qwen3 tokenizer."
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model shape (default: demo)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), default="bfloat16", help="weight dtype (default: bfloat16)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--max-shard-size", default=None, help="shard the safetensors files, e.g. 2GB")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where to draw the random weights (default cpu; 'cuda' is much faster for 8B shapes)",
    )
    parser.add_argument("--skip-if-exists", action="store_true", help="do nothing if OUT/config.json exists")
    args = parser.parse_args(argv)
    if args.skip_if_exists and (args.out / "config.json").is_file():
        print(f"{args.out} exists; skipping")
        return 0
    write_checkpoint(
        args.out,
        args.preset,
        dtype=torch_dtype(args.dtype),
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        device=args.device,
    )
    print(f"wrote {args.preset} checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
