"""Structured output in the engine core (CPU, the demo model: random weights in Qwen3's shapes, the real tokenizer).

Every output that ends with EOS (finish reason stop) must satisfy its constraint (``jsonschema`` /
``re.fullmatch`` / the choice list); every output cut by max_tokens must be a prefix its grammar accepts
(checked token by token with a fresh xgrammar matcher). The batched mask path is checked against a
reference that applies xgrammar's matcher one request at a time.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr
from structured_cases import REGEXES, SCHEMAS

from engine_service.constraints import ConstraintKind, OutputConstraint
from engine_service.core.llm import LLM, CompletionOutput
from engine_service.core.sampler import Sampler, SamplingBatch
from engine_service.core.sequence import Sequence
from engine_service.core.structured_output import GrammarMask, StructuredOutputManager, ThinkingTokens
from engine_service.sampling_params import SamplingParams
from service_common.validation import FieldError

EOS = (151645, 151643)
THINK_END = 151668


@pytest.fixture(scope="module")
def llm(demo_checkpoint: Path) -> Iterator[LLM]:
    """Async scheduling: a step with constrained rows is sampled after the step in flight is applied (the
    synchronous path runs in test_preemption_keeps_the_constraint)."""
    with LLM(demo_checkpoint, device="cpu", num_kv_blocks=256, async_scheduling=True) as engine:
        yield engine


def compiler(llm: LLM) -> xgr.GrammarCompiler:
    return llm.engine.structured.compilation._load()


def fresh_matcher(llm: LLM, c: OutputConstraint) -> xgr.GrammarMatcher:
    """A matcher of ``c`` built here, not the engine's (same compiler options as the engine's)."""
    comp = compiler(llm)
    if c.kind is ConstraintKind.JSON_SCHEMA:
        return xgr.GrammarMatcher(comp.compile_json_schema(c.spec, any_whitespace=False))
    if c.kind is ConstraintKind.REGEX:
        return xgr.GrammarMatcher(comp.compile_regex(c.spec))
    return xgr.GrammarMatcher(comp.compile_grammar(c.spec))


def check_output(llm: LLM, c: OutputConstraint, out: CompletionOutput) -> None:
    if out.finish_reason == "stop":
        assert out.token_ids[-1] in EOS
        text = llm._tokenizer.decode(out.token_ids[:-1], skip_special_tokens=False)
        if c.kind is ConstraintKind.JSON_SCHEMA:
            jsonschema.validate(json.loads(text), json.loads(c.spec))
        elif c.kind is ConstraintKind.REGEX:
            assert re.fullmatch(c.spec, text), (c.spec, text)
        return
    assert out.finish_reason == "length"
    matcher = fresh_matcher(llm, c)
    for token in out.token_ids:
        assert matcher.accept_token(token), (c.spec, out.token_ids)


def constrained(kind: ConstraintKind, spec: str = "", **options: object) -> SamplingParams:
    choices = options.pop("choices", ())
    return SamplingParams(constraint=OutputConstraint(kind, spec, choices=choices), **options)  # type: ignore[arg-type]


def test_json_schemas_and_regexes_hold_in_one_batch(llm: LLM) -> None:
    cases = [OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(s)) for s in SCHEMAS]
    cases += [OutputConstraint(ConstraintKind.REGEX, r) for r in REGEXES]
    params = [SamplingParams(seed=i, max_tokens=24, constraint=c) for i, c in enumerate(cases)]
    outs = llm.generate([[9707, 11]] * len(params), params)
    for c, out in zip(cases, outs):
        check_output(llm, c, out)
    finished = sum(out.finish_reason == "stop" for out in outs)
    assert finished >= len(outs) // 2, [o.finish_reason for o in outs]  # the checks above are not vacuous
    assert not llm.engine.structured._grammars  # every matcher released with its request


def test_choice_returns_only_listed_strings(llm: LLM) -> None:
    choices = ("yes", "no", 'say "maybe"', "naïve\\path")
    params = [constrained(ConstraintKind.CHOICE, choices=choices, seed=s, max_tokens=16) for s in range(6)]
    for out in llm.generate([[9707]] * len(params), params):
        assert out.finish_reason == "stop"
        assert llm._tokenizer.decode(out.token_ids[:-1], skip_special_tokens=False) in choices


def test_each_of_n_samples_has_its_own_matcher(llm: LLM) -> None:
    """n > 1 with a constraint: one compilation, a matcher per sample; every sample is one of the choices."""
    choices = ("alpha", "beta", "gamma delta")
    engine = llm.engine
    engine.add_request("n3", [9707], constrained(ConstraintKind.CHOICE, choices=choices, seed=11, max_tokens=16, n=3))
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.index, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.index] = str(out.finish_reason)
    assert sorted(tokens) == [0, 1, 2]
    for index, ids in tokens.items():
        assert "stop" in reasons[index].lower()
        assert llm._tokenizer.decode(ids[:-1], skip_special_tokens=False) in choices


def test_unconstrained_rows_are_untouched(llm: LLM) -> None:
    """The mask touches only the constrained rows: a free row samples the same with or without them."""
    schemas = [json.dumps(s) for s in SCHEMAS[:3]]
    free = SamplingParams(seed=3, max_tokens=5, ignore_eos=True)
    mixed = [constrained(ConstraintKind.JSON_SCHEMA, s, seed=7, max_tokens=5) for s in schemas] + [free]
    plain = [SamplingParams(seed=7, max_tokens=5) for _ in schemas] + [free]
    assert llm.generate([[9707, 11]] * 4, mixed)[-1].token_ids == llm.generate([[9707, 11]] * 4, plain)[-1].token_ids


def test_invalid_constraints_fail_alone_with_the_compilers_message(llm: LLM) -> None:
    bad = [
        (ConstraintKind.JSON_SCHEMA, '{"type": "objec"}', "json_schema", "objec"),
        (ConstraintKind.JSON_SCHEMA, "{not json", "json_schema", "parse JSON"),
        (ConstraintKind.REGEX, "a(b", "regex", "parenthesis"),
        (ConstraintKind.GRAMMAR, "root ::= foo", "grammar", 'Rule "foo" is not defined'),
    ]
    for kind, spec, field, words in bad:
        with pytest.raises(FieldError) as err:
            llm.generate([[9707]], [constrained(kind, spec, max_tokens=4)])
        assert err.value.field == field and words in err.value.message and "does not compile" in err.value.message
        assert ".cc:" not in err.value.message  # the C++ location is stripped
    (out,) = llm.generate([[9707]], [constrained(ConstraintKind.REGEX, "ok", max_tokens=4)])  # still serving
    assert out.token_ids[-1] in EOS


def test_grammar_and_json_object(llm: LLM) -> None:
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9]'
    params = [constrained(ConstraintKind.GRAMMAR, grammar, seed=s, max_tokens=10) for s in range(3)]
    params += [constrained(ConstraintKind.JSON_OBJECT, seed=s, max_tokens=10) for s in range(3)]
    outs = llm.generate([[9707]] * 6, params)
    for out in outs[:3]:
        check_output(llm, OutputConstraint(ConstraintKind.GRAMMAR, grammar), out)
    for out in outs[3:]:
        text = llm._tokenizer.decode(out.token_ids[:-1])
        if out.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{")


def test_preemption_keeps_the_constraint(demo_checkpoint: Path) -> None:
    """A pool too small for the batch preempts by recompute (synchronous steps here): the matchers follow the
    known output, which preemption keeps, so every output still holds."""
    params = [constrained(ConstraintKind.REGEX, r"[a-z]+", seed=s, max_tokens=16) for s in range(4)]
    with LLM(demo_checkpoint, device="cpu", num_kv_blocks=6, kv_block_size=16, async_scheduling=False) as small:
        outs = small.generate([list(range(1000, 1020))] * 4, params)
        assert small.engine.scheduler.num_preemptions_total > 0
        assert not small.engine.structured._grammars
    for out in outs:
        text = small._tokenizer.decode(out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids)
        assert re.fullmatch(r"[a-z]+", text), text


def test_tensor_parallel_async_steps_with_deferred_sampling_match_one_rank(demo_checkpoint: Path) -> None:
    """TP=2 (gloo) with async steps: a constrained step's sampler is queued a step late (after its mask's fill),
    so the workers wait in the sampled-ids broadcast meanwhile; every token equals TP=1 with synchronous steps."""
    params = [
        constrained(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMAS[0]), temperature=0.0, max_tokens=24),
        constrained(ConstraintKind.REGEX, REGEXES[0], temperature=0.8, seed=3, max_tokens=16),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
    ]
    prompts = [list(range(1000, 1012)), list(range(2000, 2020)), list(range(3000, 3007))]
    with LLM(demo_checkpoint, device="cpu", num_kv_blocks=64, async_scheduling=False) as one:
        ref = one.generate(prompts, params)
    with LLM(demo_checkpoint, device="cpu", num_kv_blocks=64, async_scheduling=True, tensor_parallel_size=2) as two:
        got = two.generate(prompts, params)
        assert not two.engine.structured._grammars
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in ref]


def test_thinking_prompts_start_the_constraint_after_think_end(llm: LLM) -> None:
    thinking = ThinkingTokens(151667, THINK_END, 151644, (77091,))
    assistant = [151644, 77091, 198]  # <|im_start|>assistant\n
    assert thinking.leaves_thinking_open([1, 2, *assistant])
    assert not thinking.leaves_thinking_open([1, 2, *assistant, 151667, 271, THINK_END, 271])  # thinking off
    assert thinking.leaves_thinking_open([*assistant, 151667, 5])  # inside an open <think>
    assert not thinking.leaves_thinking_open([9707, 11])  # raw completion
    assert not thinking.leaves_thinking_open([151644, 872, 198, 5])  # a user turn
    # The model may think first: </think> (forced here by its bias) is free, the regex starts after it.
    p = constrained(ConstraintKind.REGEX, "[a-c]{2}", seed=1, max_tokens=8, logit_bias={THINK_END: 100.0})
    (out,) = llm.generate([[9707, *assistant]], [p])
    assert out.token_ids[0] == THINK_END and out.finish_reason == "stop"
    assert re.fullmatch("[a-c]{2}", llm._tokenizer.decode(out.token_ids[1:-1]))
    first = SamplingParams(
        seed=1,
        max_tokens=8,
        logit_bias={THINK_END: 100.0},
        constraint=OutputConstraint(ConstraintKind.REGEX, "[a-c]{2}", from_first_token=True),
    )
    (out,) = llm.generate([[9707, *assistant]], [first])
    assert THINK_END not in out.token_ids and re.fullmatch("[a-c]{2}", llm._tokenizer.decode(out.token_ids[:-1]))


def test_abort_while_compiling_and_while_running(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("a", [9707], constrained(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMAS[5]), max_tokens=8))
    assert engine.abort_request("a") is not None and not engine.has_unfinished_requests()
    engine.add_request("b", [9707], constrained(ConstraintKind.REGEX, "[a-z]{30}", max_tokens=30))
    while not engine.structured.has_grammar(engine.requests["b"][0]):
        engine.step()
    engine.step()
    assert engine.abort_request("b") is not None
    while engine.has_unfinished_requests():
        engine.step()
    assert not engine.structured._grammars and not engine.structured.num_compiling
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_batched_mask_equals_one_request_at_a_time(llm: LLM) -> None:
    """The sampler with one bitmask for the batch picks the same tokens, step after step, as a reference that
    fills each request's mask alone with its own matcher and samples that row alone (same seed)."""
    comp = compiler(llm)
    vocab = llm.engine.vocab_size
    grammars = [comp.compile_json_schema(json.dumps(s), any_whitespace=False) for s in SCHEMAS[:4]]
    grammars += [comp.compile_regex(r) for r in REGEXES[:2]]
    params = [SamplingParams(seed=i, temperature=1.0 if i % 2 else 0.0, top_k=50 if i % 3 else -1) for i in range(6)]
    params.append(SamplingParams(seed=11))  # unconstrained row
    batched = [xgr.GrammarMatcher(g) for g in grammars]
    alone = [xgr.GrammarMatcher(g) for g in grammars]
    outputs: list[list[int]] = [[] for _ in params]
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler()
    for _ in range(8):
        logits = torch.randn(len(params), vocab, generator=gen) * 4  # [S, V]
        live = [i for i, m in enumerate(batched) if not m.is_terminated()]
        bitmask = xgr.allocate_token_bitmask(len(params), vocab)
        xgr.BatchGrammarMatcher().batch_fill_next_token_bitmask([batched[i] for i in live], bitmask, live)
        grammar = GrammarMask(bitmask, live) if live else None
        batch = SamplingBatch.build(params, [[1]] * len(params), outputs, EOS, [p.seed for p in params], vocab, "cpu")
        batch.grammar = grammar
        tokens = sampler(logits, batch).token_ids.tolist()
        for i, p in enumerate(params):
            row = logits[i : i + 1].clone()
            if i < len(alone) and not alone[i].is_terminated():
                mask = xgr.allocate_token_bitmask(1, vocab)
                alone[i].fill_next_token_bitmask(mask)
                xgr.apply_token_bitmask_inplace(row, mask)
            one = SamplingBatch.build([p], [[1]], [outputs[i]], EOS, [p.seed], vocab, "cpu")
            assert sampler(row, one).token_ids.item() == tokens[i], f"row {i}"
        for i, token in enumerate(tokens):
            outputs[i].append(token)
            if i < len(batched) and i in live:
                assert batched[i].accept_token(token) and alone[i].accept_token(token)
    assert any(outputs[i] != outputs[-1] for i in range(len(grammars)))


def test_an_engine_without_constrained_requests_never_imports_xgrammar(demo_checkpoint: Path) -> None:
    """xgrammar is imported at the first constrained request, so an engine serving none (or a machine without
    the wheel) never loads it."""
    code = (
        "import sys; from engine_service import LLM, SamplingParams; "
        f"llm = LLM({str(demo_checkpoint)!r}, device='cpu', num_kv_blocks=16); "
        "llm.generate([[1, 2, 3]], [SamplingParams(max_tokens=2)]); llm.shutdown(); "
        "print('xgrammar' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout


@dataclass(eq=False)
class _Row:
    """What the manager reads of a sequence: its params (the constraint) and its prompt."""

    params: SamplingParams
    prompt_token_ids: list[int]


def _manager_with(demo_checkpoint: Path, llm: LLM, rows: list[_Row]) -> StructuredOutputManager:
    manager = StructuredOutputManager(str(demo_checkpoint), llm.engine.vocab_size, EOS, 8, torch.device("cpu"))
    for row in rows:
        manager.submit([row])  # type: ignore[list-item]
    ready: list[list[Sequence]] = []
    while len(ready) < len(rows):
        done, failed = manager.poll(timeout=5.0)
        assert not failed
        ready += done
    return manager


def test_batched_accept_and_fill_follow_one_matcher_per_row(demo_checkpoint: Path, llm: LLM) -> None:
    """The manager's step-wide ``accept`` (one xgrammar batch call for the rows mid-grammar) and ``start_mask``
    (rows whose grammar is still active) equal a fresh matcher per row fed the same tokens: the same rejected
    rows, the same bitmask rows, and a row whose grammar ends on EOS leaves the mask."""
    spec = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
    rows = [_Row(constrained(ConstraintKind.JSON_SCHEMA, spec), [9707]) for _ in range(3)]
    manager = _manager_with(demo_checkpoint, llm, rows)
    reference = [fresh_matcher(llm, rows[0].params.constraint) for _ in rows]  # type: ignore[arg-type]
    text = llm._tokenizer.encode('{"a": 12}', add_special_tokens=False).ids
    wrong = llm._tokenizer.encode("x", add_special_tokens=False).ids[0]
    # row 0 writes the object and EOS; row 1 the object then keeps going past EOS's place; row 2 breaks at once
    streams = [[*text, EOS[0]], [*text, text[-1]], [wrong]]
    vocab = llm.engine.vocab_size
    for step in range(len(text) + 1):
        live = [(i, s[step]) for i, s in enumerate(streams) if step < len(s)]
        mask = manager.start_mask(rows).result()  # type: ignore[arg-type]
        expect_rows = [i for i, m in enumerate(reference) if streams[i] and not m.is_terminated()]
        assert mask is not None and list(mask.rows) == expect_rows
        for i in expect_rows:
            alone = xgr.allocate_token_bitmask(1, vocab)
            reference[i].fill_next_token_bitmask(alone)
            assert torch.equal(mask.bitmask[i], alone[0]), (step, i)
        rejected = manager.accept([(i, rows[i]) for i, _ in live], [t for _, t in live])  # type: ignore[misc]
        expect_rejected = {i for i, t in live if not reference[i].accept_token(t)}
        assert rejected == expect_rejected, step
        for i in expect_rejected:
            streams[i] = []
            manager.release(rows[i])  # type: ignore[arg-type]
    assert reference[0].is_terminated() and not manager._grammars[rows[0]].active  # type: ignore[index]
    manager.shutdown()


def test_the_mask_fill_starts_while_the_engine_thread_runs_python(demo_checkpoint: Path, llm: LLM) -> None:
    """The fill thread needs the GIL only to enter xgrammar's fill: ``start_mask`` hands it over at once,
    instead of leaving the worker to wait for the interpreter's switch interval (5 ms) while the engine thread
    goes on in Python (it did: the fill then ended that much later and the engine thread waited for it)."""
    rows = [_Row(constrained(ConstraintKind.REGEX, "[a-z]+"), [9707])]
    manager = _manager_with(demo_checkpoint, llm, rows)
    fill, started = manager._fill, []

    def timed_fill(*args: object) -> object:
        started.append(time.perf_counter())
        return fill(*args)  # type: ignore[arg-type]

    manager._fill = timed_fill  # type: ignore[method-assign]
    delays = []
    for _ in range(9):
        begin = time.perf_counter()
        job = manager.start_mask(rows)  # type: ignore[arg-type]
        while time.perf_counter() - begin < 0.012:  # the engine thread's Python work after the start
            pass
        job.result()
        delays.append(started[-1] - begin)
    manager.shutdown()
    assert statistics.median(delays) < 0.0025, delays


def test_requests_with_one_constraint_share_its_compilation(demo_checkpoint: Path, llm: LLM) -> None:
    """Requests with an equal constraint share one compilation, in flight or done: many requests with one schema
    are ready together instead of passing one by one through the compile threads. A request that leaves while
    it compiles leaves it running for the others; once no request waits for it, it is dropped, and the next
    request with that constraint compiles it anew."""
    manager = StructuredOutputManager(str(demo_checkpoint), llm.engine.vocab_size, EOS, 8, torch.device("cpu"))
    compile_, calls, gate = manager.compilation._compile, [], threading.Event()

    def gated_compile(c: OutputConstraint) -> object:
        calls.append(c)
        assert gate.wait(30)
        return compile_(c)

    manager.compilation._compile = gated_compile  # type: ignore[method-assign]
    rows = [_Row(constrained(ConstraintKind.REGEX, "[a-z]{3}"), [9707]) for _ in range(4)]
    for row in rows:
        manager.submit([row])  # type: ignore[list-item]
    manager.release(rows[0])  # type: ignore[arg-type]  # the first leaves while its grammar compiles
    gate.set()
    ready: list[list[Sequence]] = []
    while len(ready) < 3:
        done, failed = manager.poll(timeout=5.0)
        assert not failed
        ready += done
    assert ready == [[row] for row in rows[1:]] and len(calls) == 1
    late = _Row(constrained(ConstraintKind.REGEX, "[a-z]{3}"), [9707])
    manager.submit([late])  # type: ignore[list-item]
    assert manager.poll() == ([[late]], []) and len(calls) == 1  # compiled already: ready at the first poll
    gate.clear()
    alone = _Row(constrained(ConstraintKind.REGEX, "[0-9]{3}"), [9707])
    manager.submit([alone])  # type: ignore[list-item]
    dropped = manager._compiling[alone][1]  # type: ignore[index]
    manager.release(alone)  # type: ignore[arg-type]  # no other request waits for it: dropped
    gate.set()
    again = _Row(constrained(ConstraintKind.REGEX, "[0-9]{3}"), [9707])
    manager.submit([again])  # type: ignore[list-item]
    assert manager._compiling[again][1] is not dropped  # type: ignore[index]
    assert manager.poll(timeout=5.0) == ([[again]], [])
    manager.shutdown()
