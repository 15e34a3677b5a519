"""Helpers for tests, benchmarks and the demo: random-weight Qwen3 checkpoints with the real tokenizer."""

from qwen3.testing.checkpoints import PRESETS, write_checkpoint, write_tokenizer

__all__ = ["PRESETS", "write_checkpoint", "write_tokenizer"]
