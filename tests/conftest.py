"""Shared fixtures: random-weight Qwen3 checkpoints written once per session with transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scaled-down Qwen3 (fp32, GQA 2, head_dim 32 != 64 / 4, tied embeddings)."""
    from qwen3.testing import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", init_std=0.5, with_tokenizer=False)


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model: full Qwen3 vocabulary and the real Qwen3 tokenizer, tiny layers."""
    from qwen3.testing import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("demo"), "demo", init_std=0.2)


@pytest.fixture(scope="session")
def tokenizer(demo_checkpoint: Path):
    """The demo checkpoint's tokenizer service tokenizer (the real Qwen3 tokenizer and chat template)."""
    from tokenizer_service.chat_template import ChatTokenizer

    return ChatTokenizer.from_pretrained(demo_checkpoint)
