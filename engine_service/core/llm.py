"""Offline API: ``LLM(model_dir).generate(prompts, SamplingParams(...))``, for scripts, tests and benchmarks."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

from engine_service.config import EngineConfig
from engine_service.core.engine import LLMEngine
from engine_service.protocol import TokenLogprob
from engine_service.sampling_params import SamplingParams
from service_common.validation import FieldError


@dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "aborted" | "error"
    logprobs: list[TokenLogprob] | None
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None  # with SamplingParams.prompt_logprobs: prompt tokens 1..P-1


class LLM:
    """Engine options are ``EngineConfig``'s fields (``tensor_parallel_size``, ``dtype``, ``max_model_len``,
    ``gpu_memory_utilization``, ``enforce_eager``, ``kv_block_size``, ``device``, ``attention_backend``, ...)."""

    def __init__(self, model: str | Path, **engine_options: object) -> None:
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_options))  # type: ignore[arg-type]
        self._tokenizer = None
        tokenizer_file = Path(model) / "tokenizer.json"
        if tokenizer_file.is_file():
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._ids = itertools.count()

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self._tokenizer is None:
                raise ValueError("prompts: text prompts need a tokenizer.json in the model directory")
            return self._tokenizer.encode(prompt, add_special_tokens=False).ids
        return list(prompt)

    def generate(
        self, prompts: Seq[str | list[int]] | str, sampling_params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[CompletionOutput]:
        """Generate for every prompt (token-id lists or strings); one output per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = (
            list(sampling_params)
            if isinstance(sampling_params, (list, tuple))
            else [sampling_params or SamplingParams()] * len(prompts)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params_list)} for {len(prompts)} prompts")
        encoded = [self._encode(p) for p in prompts]
        for ids, params in zip(encoded, params_list):
            if params.n != 1:  # one CompletionOutput per prompt: repeat the prompt (with seed + i) instead
                raise FieldError("n", f"the offline LLM returns one output per prompt; got n={params.n}")
            self.engine.validate(ids, params)  # all-or-nothing: reject before anything runs
        order: list[str] = []
        tokens: dict[str, list[int]] = {}
        logprobs: dict[str, list[TokenLogprob]] = {}
        finals = {}
        prompt_logprobs: dict[str, list[TokenLogprob]] = {}
        for ids, params in zip(encoded, params_list):
            rid = f"offline-{next(self._ids)}"
            order.append(rid)
            tokens[rid], logprobs[rid] = [], []
            self.engine.add_request(rid, ids, params)
        while self.engine.has_unfinished_requests():
            outputs = self.engine.step()
            failed = self.engine.take_failed()  # e.g. a constraint that does not compile: nothing is returned
            if failed:
                for rid in order:
                    self.engine.abort_request(rid)
                raise failed[0][1]
            for out in outputs:
                tokens[out.request_id].extend(out.new_token_ids)
                if out.new_logprobs:
                    logprobs[out.request_id].extend(out.new_logprobs)
                if out.prompt_logprobs is not None:
                    prompt_logprobs[out.request_id] = out.prompt_logprobs
                if out.finished:
                    finals[out.request_id] = out
        results = []
        for rid, ids, params in zip(order, encoded, params_list):
            final = finals[rid]
            text = self._tokenizer.decode(tokens[rid], skip_special_tokens=True) if self._tokenizer else ""
            results.append(
                CompletionOutput(
                    rid,
                    ids,
                    tokens[rid],
                    text,
                    final.finish_reason.value,
                    logprobs[rid] if params.logprobs is not None else None,
                    final.num_cached_tokens,
                    prompt_logprobs.get(rid) if params.prompt_logprobs is not None else None,
                )
            )
        return results

    def embed(self, prompts: Seq[str | list[int]], normalize: bool | None = None) -> list[list[float]]:
        """Each prompt's embedding (last-token pooling; ``normalize`` None: the checkpoint's default, see
        ``engine_service.pooling``), batched together; one per prompt, in order."""
        encoded = [self._encode(p) for p in prompts]
        for ids in encoded:
            self.engine.info.validate_embed(ids)  # all-or-nothing: reject before anything runs
        flag = self.engine.info.pooling.normalize if normalize is None else normalize
        order = [f"offline-embed-{next(self._ids)}" for _ in encoded]
        for rid, ids in zip(order, encoded):
            self.engine.add_embed_request(rid, ids, flag)
        results = {}
        while self.engine.has_unfinished_requests():
            self.engine.step()
            results.update((e.request_id, e.embedding) for e in self.engine.pop_embeddings())
        return [results[rid] for rid in order]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
