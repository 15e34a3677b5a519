"""Engine on CUDA (run on the lent H100 and H200; skipped with the reason on CPU machines).

- decode through CUDA graphs gives the same greedy tokens as eager decode;
- each GPU attention backend gives the same greedy tokens as the torch reference backend on the same bf16
  checkpoint for the first 32 tokens, or the divergence is a bf16 near-tie (logit gap shown);
- async scheduling gives the same greedy tokens as synchronous steps (or near-ties), and penalties with a
  step in flight run on the device (the exact comparison with penalties is the CPU test's).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from engine_service import LLM, SamplingParams  # noqa: E402
from qwen3.attention.backend import backend_unavailable_reason  # noqa: E402

BF16_TIE = 2 * 0.0625  # two bf16 spacings at logit magnitude 8..16
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwen3.testing import write_checkpoint

    # Real Qwen3 head geometry (16 q / 8 kv heads, head_dim 128), fewer layers; wide init keeps logit gaps large.
    return write_checkpoint(
        tmp_path_factory.mktemp("bf16"),
        "qwen3-0.6b",
        dtype=torch.bfloat16,
        init_std=0.05,
        num_hidden_layers=4,
        with_tokenizer=False,
    )


def prompts(n: int = 12) -> list[list[int]]:
    rng = random.Random(0)
    return [
        [rng.randrange(10_000) for _ in range(rng.choice([1, 15, 16, 17, 100, 255, 256, 257, 700]))] for _ in range(n)
    ]


def run(model: Path, **options) -> list:
    with LLM(model, device="cuda", max_model_len=2048, gpu_memory_utilization=0.5, **options) as llm:
        return llm.generate(prompts(), GREEDY)


def assert_same_or_near_tie(got: list, ref: list, what: str) -> None:
    for i, (g, r) in enumerate(zip(got, ref)):
        if g.token_ids == r.token_ids:
            continue
        k = next(j for j, (a, b) in enumerate(zip(g.token_ids, r.token_ids)) if a != b)
        # At the first divergence the reference's top-2 alternatives must be a bf16 near-tie: the logits come
        # out of the LM head in bf16, whose 8 significant bits space logits of magnitude 8..16 by 0.0625, so
        # a top-2 gap of one or two such steps is a tie that the kernels' summation order may break.
        top = r.logprobs[k].top
        gap = top[0][1] - top[1][1] if len(top) > 1 else float("inf")
        print(f"{what}: prompt {i} diverges at token {k}; reference top-2 logprob gap {gap:.4f}")
        assert gap <= BF16_TIE, (
            f"{what}: prompt {i} diverges at token {k} with a logprob gap of {gap:.4f} (not a near-tie)"
        )


@pytest.mark.parametrize("backend", ["triton", "flash-attn"])
def test_cuda_graph_decode_matches_eager(bf16_checkpoint: Path, backend: str) -> None:
    reason = backend_unavailable_reason(backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    eager = run(bf16_checkpoint, attention_backend=backend, enforce_eager=True)
    graphed = run(bf16_checkpoint, attention_backend=backend, enforce_eager=False)
    # Graph replays use the captured (widest) block table, so split-K may reduce in another order: bf16
    # near-ties may flip; anything else is a bug.
    assert_same_or_near_tie(graphed, eager, f"{backend} graphs vs eager")


@pytest.mark.parametrize("backend", ["triton", "flash-attn"])
def test_gpu_backend_matches_torch_reference(bf16_checkpoint: Path, backend: str) -> None:
    reason = backend_unavailable_reason(backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    ref = run(bf16_checkpoint, attention_backend="torch", enforce_eager=True)
    got = run(bf16_checkpoint, attention_backend=backend)
    assert_same_or_near_tie(got, ref, backend)


@pytest.mark.parametrize("backend", ["triton", "flash-attn"])
def test_fp32_picks_torch_and_refuses_fp16_only_backends(backend: str) -> None:
    from qwen3.attention.backend import create_backend

    cuda = torch.device("cuda")
    assert create_backend("auto", cuda, torch.float32).name == "torch"
    if backend_unavailable_reason(backend, cuda) is None:
        with pytest.raises(ValueError, match="not float32"):
            create_backend(backend, cuda, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "flash-attn"])
def test_async_scheduling_matches_synchronous_steps(bf16_checkpoint: Path, backend: str) -> None:
    reason = backend_unavailable_reason(backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    sync = run(bf16_checkpoint, attention_backend=backend, async_scheduling=False)
    overlapped = run(bf16_checkpoint, attention_backend=backend, async_scheduling=True)
    # A finished row stays in the batch one step longer with overlap, so some steps replay another graph
    # bucket (other GEMM shapes): bf16 near-ties may flip; anything else is a bug.
    assert_same_or_near_tie(overlapped, sync, f"{backend} async vs sync steps")


@pytest.mark.parametrize("backend", ["triton", "flash-attn"])
def test_async_penalties_count_the_token_in_flight(bf16_checkpoint: Path, backend: str) -> None:
    """A huge repetition penalty forbids every prompt token and every earlier output token. With a step in
    flight the previous output token is still on the device when the next step samples; it must count.

    This runs the device-side path on CUDA (graphs, async steps). Whether it would catch a token left
    uncounted depends on the checkpoint wanting to repeat itself (printed); the CPU test
    ``test_penalties_read_the_token_in_flight`` has a case that does."""
    reason = backend_unavailable_reason(backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    banned = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, repetition_penalty=1e4)
    with LLM(
        bf16_checkpoint,
        device="cuda",
        max_model_len=2048,
        gpu_memory_utilization=0.5,
        attention_backend=backend,
        async_scheduling=True,
    ) as llm:
        free = llm.generate(prompts(), GREEDY)
        penalised = llm.generate(prompts(), banned)
    repeats = sum(len(o.token_ids) - len(set(o.token_ids)) for o in free)
    print(f"{backend}: unpenalised greedy outputs repeat a token {repeats} times")  # the case's teeth
    for prompt, out in zip(prompts(), penalised):
        assert len(out.token_ids) == 32
        assert len(set(out.token_ids)) == 32, f"a token repeats: {out.token_ids}"
        assert not set(out.token_ids) & set(prompt)
