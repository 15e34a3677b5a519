"""Prompt logprobs and output logprobs against transformers (CPU, the tiny fp32 random Qwen3 checkpoint).

The reference is ``log_softmax`` of ``AutoModelForCausalLM``'s fp32 logits of the sequence run alone. Our
logits match those to 1e-4 of their largest magnitude (tests/test_model_parity.py); a log-softmax moves that
error by at most twice, so every logprob here must be within ``TOL`` = 1e-3 (absolute, natural log) of the
reference, and the top-k ids must be the reference's exactly (init_std 0.5 keeps the logits far from ties).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers import hf_logits

from engine_service import LLM, SamplingParams
from engine_service.core import prompt_outputs
from engine_service.protocol import TokenLogprob
from service_common.validation import FieldError

TOL = 1e-3
TOP = 5


def hf_logprobs(path: Path, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab] fp32: row i is the distribution of the token after position i."""
    return torch.log_softmax(hf_logits(path, token_ids), dim=-1)


def random_prompt(n: int, seed: int, vocab: int = 512) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def assert_matches(got: list[TokenLogprob], targets: list[int], ref: torch.Tensor, k: int, what: str) -> None:
    """``got[i]`` is the logprob of ``targets[i]`` under ``ref[i]``, with ``ref[i]``'s top ``k``."""
    assert len(got) == len(targets) == len(ref), f"{what}: {len(got)} entries for {len(targets)} tokens"
    for i, (lp, target) in enumerate(zip(got, targets)):
        assert lp.token_id == target, f"{what}[{i}]: token {lp.token_id} != {target}"
        assert abs(lp.logprob - ref[i, target].item()) <= TOL, f"{what}[{i}]: {lp.logprob} vs {ref[i, target]}"
        values, ids = ref[i].topk(k)
        assert [t for t, _ in lp.top] == ids.tolist(), f"{what}[{i}]: top-{k} ids differ"
        assert max((abs(v - r) for (_, v), r in zip(lp.top, values.tolist())), default=0.0) <= TOL, f"{what}[{i}]"


def assert_prompt_logprobs(path: Path, prompt: list[int], got: list[TokenLogprob] | None, k: int, what: str) -> None:
    assert got is not None, f"{what}: no prompt logprobs"
    ref = hf_logprobs(path, prompt)
    assert_matches(got, prompt[1:], ref[:-1], k, what)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(tiny_checkpoint, device="cpu", num_kv_blocks=256, kv_block_size=16)


def test_prompt_logprobs_match_transformers(llm: LLM, tiny_checkpoint: Path) -> None:
    """Prompts of 1, 2, 17 and 40 tokens batched with a request that does not ask: one entry per prompt
    token from the second on, each equal to transformers' log-softmax, top-k ids included."""
    prompts = [random_prompt(n, seed=n) for n in (1, 2, 17, 40)]
    asking = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=TOP)
    plain = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = llm.generate([*prompts, random_prompt(25, seed=99)], [asking] * len(prompts) + [plain])
    for prompt, out in zip(prompts, outs):
        assert_prompt_logprobs(tiny_checkpoint, prompt, out.prompt_logprobs, TOP, f"prompt of {len(prompt)}")
    assert outs[0].prompt_logprobs == []  # a one-token prompt: nothing precedes its only token
    assert outs[-1].prompt_logprobs is None


def test_prompt_logprobs_zero_is_the_tokens_own_only(llm: LLM, tiny_checkpoint: Path) -> None:
    prompt = random_prompt(12, seed=5)
    (out,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
    assert out.prompt_logprobs is not None and all(lp.top == () for lp in out.prompt_logprobs)
    assert_prompt_logprobs(tiny_checkpoint, prompt, out.prompt_logprobs, 0, "prompt_logprobs=0")


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async-scheduling"])
def test_prompt_logprobs_through_chunked_prefill(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, overlap: bool
) -> None:
    """A 70-token prompt in 16-token prefill chunks (sharing steps with other requests), the LM head run over
    3 positions at a time: positions accumulate across chunks and still equal one-shot transformers."""
    monkeypatch.setattr(prompt_outputs, "PROMPT_LOGPROBS_CHUNK_ELEMENTS", 3 * 512)
    assert prompt_outputs.rows_per_chunk(512) == 3
    prompts = [random_prompt(70, seed=7), random_prompt(33, seed=8), random_prompt(20, seed=9)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=TOP),
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=2),
    ]
    with LLM(
        tiny_checkpoint, device="cpu", num_kv_blocks=64, max_num_batched_tokens=16, max_num_seqs=4,
        async_scheduling=overlap,
    ) as chunked:  # fmt: skip
        outs = chunked.generate(prompts, params)
    assert_prompt_logprobs(tiny_checkpoint, prompts[0], outs[0].prompt_logprobs, TOP, "70 tokens, chunked")
    assert_prompt_logprobs(tiny_checkpoint, prompts[2], outs[2].prompt_logprobs, 2, "20 tokens, chunked")
    assert outs[1].prompt_logprobs is None


def test_prompt_logprobs_bypass_the_prefix_cache(llm: LLM, tiny_checkpoint: Path) -> None:
    """The same prompt, cached by a first request, is recomputed in full when prompt logprobs are asked."""
    prompt = random_prompt(48, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate([prompt], params)
    (again,) = llm.generate([prompt], params)
    assert again.num_cached_tokens == 32  # the cache holds its full blocks: the bypass below is real
    (asking,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1))
    assert asking.num_cached_tokens == 0
    assert_prompt_logprobs(tiny_checkpoint, prompt, asking.prompt_logprobs, 1, "after a cached run")
    assert asking.token_ids == again.token_ids


def test_output_logprobs_match_transformers_greedy(llm: LLM, tiny_checkpoint: Path) -> None:
    """SamplingParams.logprobs on greedy decoding: each generated token's logprob and top-k equal the
    log-softmax of transformers' logits at the position before it."""
    prompts = [random_prompt(n, seed=20 + n) for n in (3, 18, 35)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=TOP)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.logprobs is not None
        ref = hf_logprobs(tiny_checkpoint, prompt + out.token_ids)[len(prompt) - 1 : -1]
        assert_matches(out.logprobs, out.token_ids, ref, TOP, f"output of a {len(prompt)}-token prompt")
        assert all(lp.token_id == lp.top[0][0] for lp in out.logprobs)  # greedy: the chosen token is the top one


def test_prompt_logprobs_limit_names_the_field() -> None:
    with pytest.raises(FieldError) as err:
        SamplingParams(prompt_logprobs=21)
    assert err.value.field == "prompt_logprobs" and "20" in err.value.message
    with pytest.raises(FieldError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_tensor_parallel_2(tiny_checkpoint: Path) -> None:
    """With the vocabulary split over two ranks (gloo), prompt logprobs through 16-token chunks and an
    embedding still equal transformers': every rank runs the LM head's all-gather over the same chunks."""
    from test_embed import assert_embedding, hf_embedding

    prompt = random_prompt(30, seed=31)
    with LLM(
        tiny_checkpoint, device="cpu", tensor_parallel_size=2, num_kv_blocks=64, max_num_batched_tokens=16,
        max_num_seqs=4,
    ) as tp2:  # fmt: skip
        (out,) = tp2.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3))
        (vector,) = tp2.embed([prompt])
    assert_prompt_logprobs(tiny_checkpoint, prompt, out.prompt_logprobs, 3, "TP=2")
    assert_embedding(vector, hf_embedding(tiny_checkpoint, prompt), "TP=2")
