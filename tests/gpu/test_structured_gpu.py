"""Structured output on CUDA (skipped with the reason on CPU machines): the bitmask filled on the host while the
device runs the forward pass, copied and applied on the device, one step in flight.

Every output finished by EOS is one its grammar accepts whole (a fresh xgrammar matcher takes every token and
EOS, and terminates; JSON parses, a regex output matches ``re.fullmatch``), every output cut by max_tokens is
a prefix its grammar accepts, and none fails. (The CPU tests validate
with ``jsonschema`` too, which the GPU machine lacks.)
"""

from __future__ import annotations

import json
import re

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

import xgrammar as xgr  # noqa: E402
from structured_cases import REGEXES, SCHEMAS  # noqa: E402

from engine_service import LLM, SamplingParams  # noqa: E402
from engine_service.constraints import ConstraintKind, OutputConstraint  # noqa: E402

EOS = (151645, 151643)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from qwen3.testing import write_checkpoint

    model = write_checkpoint(tmp_path_factory.mktemp("demo"), "demo", init_std=0.2)
    with LLM(model, async_scheduling=True, gpu_memory_utilization=0.3) as engine:
        yield engine


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_constrained_outputs_hold_on_cuda(llm: LLM, temperature: float) -> None:
    cases = [OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(s)) for s in SCHEMAS]
    cases += [OutputConstraint(ConstraintKind.REGEX, r) for r in REGEXES]
    params = [SamplingParams(seed=i, temperature=temperature, max_tokens=24, constraint=c) for i, c in enumerate(cases)]
    params += [SamplingParams(seed=99, temperature=temperature, max_tokens=24)]  # an unconstrained row beside them
    outs = llm.generate([[9707, 11]] * len(params), params)
    compiler = llm.engine.structured.compilation._load()
    for c, out in zip(cases, outs):
        assert out.finish_reason in ("stop", "length"), out.finish_reason
        grammar = (
            compiler.compile_json_schema(c.spec, any_whitespace=False)
            if c.kind is ConstraintKind.JSON_SCHEMA
            else compiler.compile_regex(c.spec)
        )
        matcher = xgr.GrammarMatcher(grammar)
        assert all(matcher.accept_token(t) for t in out.token_ids), (c.spec, out.token_ids)
        if out.finish_reason == "stop":
            assert out.token_ids[-1] in EOS and matcher.is_terminated(), (c.spec, out.token_ids)
            text = llm._tokenizer.decode(out.token_ids[:-1], skip_special_tokens=False)
            if c.kind is ConstraintKind.JSON_SCHEMA:
                json.loads(text)
            else:
                assert re.fullmatch(c.spec, text), (c.spec, text)
    assert sum(o.finish_reason == "stop" for o in outs[: len(cases)]) >= len(cases) // 2
