"""Shared test helpers: our model with a paged KV cache, a Hugging Face reference, and batch plumbing.

Everything runs on CPU in fp32. ``load_model`` is tensor-parallel aware: called inside a process that
has joined a TP group it builds (and loads) that rank's shard, like the engine's model runner does.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch

from qwen3 import ForwardBatch, Qwen3Config, Qwen3ForCausalLM, load_checkpoint
from qwen3.attention.torch_backend import TorchAttentionBackend


def load_model(
    model_dir: str | Path, *, block_size: int = 16, num_blocks: int = 64, config: Qwen3Config | None = None
) -> Qwen3ForCausalLM:
    """Our fp32 model loaded from ``model_dir`` with a NaN-filled KV cache attached.

    NaN is the cache's initial content so that any read of a slot the step never wrote (a wrong slot
    mapping or block table) turns the logits into NaN instead of slightly wrong numbers.
    ``config`` overrides the one read from ``model_dir`` (e.g. to disable a feature on purpose).
    """
    config = config or Qwen3Config.from_pretrained(model_dir)
    model = Qwen3ForCausalLM(config, TorchAttentionBackend()).float()
    load_checkpoint(model, model_dir)
    attach_kv_cache(model, block_size=block_size, num_blocks=num_blocks)
    return model.eval()


def attach_kv_cache(model: Qwen3ForCausalLM, *, block_size: int, num_blocks: int) -> None:
    for attn in model.attention_layers():
        shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        attn.k_cache = torch.full(shape, float("nan"))
        attn.v_cache = torch.full(shape, float("nan"))


def block_size_of(model: Qwen3ForCausalLM) -> int:
    return model.attention_layers()[0].k_cache.shape[1]


class BlockPool:
    """KV blocks handed out in a shuffled order, so block tables are random and non-contiguous."""

    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"test KV pool exhausted: want {n} blocks, {len(self.free)} left")
        taken, self.free = self.free[:n], self.free[n:]
        return taken


@torch.no_grad()
def run_step(
    model: Qwen3ForCausalLM,
    new_tokens: list[list[int]],
    context_lens: list[int],
    tables: list[list[int]],
    *,
    all_logits: bool = False,
) -> list[torch.Tensor]:
    """One forward step; per sequence, logits [n, vocab] of all its new tokens (``all_logits``) or of its last."""
    batch = ForwardBatch.build(new_tokens, context_lens, tables, block_size_of(model))
    if all_logits:
        batch.logits_indices = torch.arange(batch.num_tokens)
    logits = model.compute_logits(model(batch), batch)
    if all_logits:
        return list(logits.split(batch.query_lens_cpu))
    return [row.unsqueeze(0) for row in logits]


def prefill(
    model: Qwen3ForCausalLM, prompts: list[list[int]], pool: BlockPool, extra_tokens: int = 0
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill ``prompts`` together in one packed batch, with block tables drawn from ``pool`` big
    enough for ``extra_tokens`` more per sequence. Returns all-position logits and the block tables."""
    bs = block_size_of(model)
    tables = [pool.take(-(-(len(p) + extra_tokens) // bs)) for p in prompts]
    return run_step(model, prompts, [0] * len(prompts), tables, all_logits=True), tables


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@functools.lru_cache(maxsize=8)
def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(model_dir: str | Path, token_ids: list[int]) -> torch.Tensor:
    """Hugging Face ``Qwen3ForCausalLM`` logits [len, vocab] for one sequence run alone, no padding."""
    model = _hf_model(str(model_dir))
    return model(torch.tensor([token_ids])).logits[0].float()


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    """max |actual - expected| <= rel * max |expected|, over every element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite logits"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"{what}: max abs diff {err:.3e} > {rel:g} * max |ref| ({scale:.3e})"
