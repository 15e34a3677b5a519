"""Embeddings in the engine core (CPU, fp32 tiny random Qwen3): last-token pooled, normalised final-norm hidden
states equal transformers' ``AutoModel`` ``last_hidden_state`` at the last token, alone and batched with
generation; the checkpoint's sentence-transformers config is read (``engine_service.pooling``).

Tolerance: our logits match transformers' to 1e-4 of their largest magnitude (tests/test_model_parity.py);
the hidden states feed those logits, so each embedding must be within ``TOL`` = 1e-4 of the reference (max
absolute difference per element) after normalisation, and within 1e-4 of the reference's largest magnitude
without it.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch

from engine_service import LLM, SamplingParams
from engine_service.config import EngineConfig
from engine_service.core.engine import LLMEngine
from engine_service.pooling import PoolingConfig
from service_common.validation import FieldError

TOL = 1e-4
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]
LAST_TOKEN = {"word_embedding_dimension": 64, "pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}


@functools.lru_cache(maxsize=4)
def _hf_base(model_dir: str):
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_embedding(model_dir: Path, token_ids: list[int], normalize: bool = True) -> torch.Tensor:
    """transformers' ``AutoModel`` (Qwen3Model) last_hidden_state at the last token, L2-normalised if asked."""
    state = _hf_base(str(model_dir))(torch.tensor([token_ids])).last_hidden_state[0, -1].float()
    return torch.nn.functional.normalize(state, dim=-1) if normalize else state


def assert_embedding(got: list[float], ref: torch.Tensor, what: str, normalized: bool = True) -> None:
    ours = torch.tensor(got)
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    bound = TOL if normalized else TOL * ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= bound, f"{what}: max abs diff {err:.3e} > {bound:.3e}"
    if normalized:
        assert abs(ours.norm().item() - 1) < 1e-5


def random_prompt(n: int, seed: int, vocab: int = 512) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


@pytest.fixture(scope="module")
def embedding_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in Qwen3-Embedding's layout: the bare ``Qwen3Model`` saved by transformers (tensor names
    without ``model.``, no LM head), config architectures ``Qwen3ForCausalLM``, and a sentence-transformers
    config (modules.json with Pooling + Normalize, 1_Pooling/config.json with last-token pooling)."""
    out = tmp_path_factory.mktemp("embedding")
    _hf_base(str(tiny_checkpoint)).save_pretrained(out, safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3ForCausalLM"]}))
    (out / "modules.json").write_text(json.dumps(ST_MODULES))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(LAST_TOKEN))
    return out


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(tiny_checkpoint, device="cpu", num_kv_blocks=128, kv_block_size=16)


def test_embeddings_match_transformers(llm: LLM, tiny_checkpoint: Path) -> None:
    prompts = [random_prompt(n, seed=n) for n in (1, 9, 16, 47)]
    for prompt, got in zip(prompts, llm.embed(prompts)):
        assert_embedding(got, hf_embedding(tiny_checkpoint, prompt), f"{len(prompt)} tokens")
    (raw,) = llm.embed(prompts[-1:], normalize=False)
    assert_embedding(raw, hf_embedding(tiny_checkpoint, prompts[-1], normalize=False), "raw", normalized=False)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # prefill-only: every block back in the pool


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async-scheduling"])
def test_embeddings_batched_with_generation(tiny_checkpoint: Path, overlap: bool) -> None:
    """Embed requests and greedy Generate requests in the same steps, prompts chunked by a 24-token budget:
    each embedding equals transformers', each generation equals the same request run alone."""
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_checkpoint), device="cpu", num_kv_blocks=64, max_num_batched_tokens=24, max_num_seqs=6,
            async_scheduling=overlap,
        )
    )  # fmt: skip
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    gen_prompts = {f"gen{i}": random_prompt(n, seed=40 + i) for i, n in enumerate((30, 5, 12))}
    embed_prompts = {f"emb{i}": random_prompt(n, seed=50 + i) for i, n in enumerate((3, 40, 17))}
    for rid, prompt in gen_prompts.items():
        engine.add_request(rid, prompt, greedy)
    for rid, prompt in embed_prompts.items():
        engine.add_embed_request(rid, prompt, normalize=True)
    tokens: dict[str, list[int]] = {rid: [] for rid in gen_prompts}
    embeddings = {}
    steps_with_both = 0
    while engine.has_unfinished_requests():
        running = {s.request_id for s in engine.scheduler.running}
        outputs = engine.step()
        steps_with_both += any(r.startswith("gen") for r in running) and any(r.startswith("emb") for r in running)
        for out in outputs:
            assert out.request_id in tokens, "an Embed request produced a token output"
            tokens[out.request_id] += out.new_token_ids
        for result in engine.pop_embeddings():
            embeddings[result.request_id] = result
    assert steps_with_both > 0, "embed and generate requests never shared a step"
    for rid, prompt in embed_prompts.items():
        assert embeddings[rid].num_prompt_tokens == len(prompt)
        assert_embedding(embeddings[rid].embedding, hf_embedding(tiny_checkpoint, prompt), rid)
    with LLM(tiny_checkpoint, device="cpu", num_kv_blocks=64) as alone:
        for rid, prompt in gen_prompts.items():
            assert tokens[rid] == alone.generate([prompt], greedy)[0].token_ids, rid
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.shutdown()


def test_embedding_checkpoint_layout(embedding_checkpoint: Path, tiny_checkpoint: Path) -> None:
    """A checkpoint laid out as Qwen3-Embedding's loads, and its sentence-transformers config is honoured."""
    assert PoolingConfig.from_checkpoint(embedding_checkpoint).normalize
    prompt = random_prompt(21, seed=3)
    with LLM(embedding_checkpoint, device="cpu", num_kv_blocks=32) as llm:
        assert llm.engine.info.pooling.normalize
        (got,) = llm.embed([prompt])
    assert_embedding(got, hf_embedding(embedding_checkpoint, prompt), "Qwen3-Embedding layout")
    assert_embedding(got, hf_embedding(tiny_checkpoint, prompt), "same weights as the causal-LM checkpoint")


def test_pooling_config(tmp_path: Path) -> None:
    assert PoolingConfig.from_checkpoint(tmp_path).normalize  # no modules.json: normalised (Qwen3-Embedding)
    (tmp_path / "modules.json").write_text(json.dumps(ST_MODULES[:2]))
    assert not PoolingConfig.from_checkpoint(tmp_path).normalize  # modules without Normalize
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(LAST_TOKEN))
    assert not PoolingConfig.from_checkpoint(tmp_path).normalize
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({**LAST_TOKEN, "pooling_mode_mean_tokens": True}))
    with pytest.raises(ValueError, match=r"1_Pooling/config.json: pooling_mode_mean_tokens is set"):
        PoolingConfig.from_checkpoint(tmp_path)
    (tmp_path / "modules.json").write_text("{not json")
    with pytest.raises(ValueError, match="modules.json"):
        PoolingConfig.from_checkpoint(tmp_path)


def test_bad_embed_prompts_name_the_field(llm: LLM) -> None:
    info = llm.engine.info
    for prompt, needle in (([], "must not be empty"), ([1] * info.max_model_len, "maximum length"), ([512], "512")):
        with pytest.raises(FieldError) as err:
            info.validate_embed(prompt)
        assert err.value.field == "prompt_token_ids" and needle in err.value.message


@pytest.mark.asyncio
async def test_async_embed_abort_all_and_cancel(tiny_checkpoint: Path) -> None:
    """Through the asyncio bridge: a result; an Embed waiting when the server aborts everything (shutdown)
    fails with EngineDeadError (UNAVAILABLE), not a hang; a cancelled one is aborted in the engine."""
    import asyncio

    from serving import wait_until

    from engine_service.async_engine import AsyncEngine
    from engine_service.protocol import EngineDeadError

    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_checkpoint), device="cpu", num_kv_blocks=64, max_num_batched_tokens=16, max_num_seqs=4
        )
    )
    bridge = AsyncEngine.in_thread(engine)
    bridge.start()
    try:
        prompt = random_prompt(200, seed=60)
        result = await asyncio.wait_for(bridge.embed(prompt), 60)
        assert result.num_prompt_tokens == 200
        assert_embedding(result.embedding, hf_embedding(tiny_checkpoint, prompt), "through AsyncEngine")

        waiting = asyncio.ensure_future(bridge.embed(prompt))
        await asyncio.sleep(0)  # its AddEmbedRequest is queued; the abort follows it in the same batch
        assert bridge.abort_all() == 1
        with pytest.raises(EngineDeadError, match="aborted"):
            await asyncio.wait_for(waiting, 60)

        cancelled = asyncio.ensure_future(bridge.embed(prompt))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await wait_until(lambda: not engine.has_unfinished_requests(), 30, "the cancelled Embed aborted")
        assert not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        await bridge.stop()
