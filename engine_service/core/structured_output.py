"""Structured output: compile a request's constraint (xgrammar) off the engine loop, follow each sequence's
output with its own ``GrammarMatcher``, and fill one token bitmask for a step's constrained rows.

Where the work happens (docs/ARCHITECTURE.md):

- **Compilation** runs in a thread pool (``GrammarCompiler`` with its cache on: a schema seen before compiles
  in microseconds). ``LLMEngine`` holds a constrained request out of the scheduler until its grammar is
  ready, as vLLM's WAITING_FOR_FSM; a compiler error fails that request alone with a ``FieldError`` naming
  the constraint's field and carrying the compiler's message. The tokenizer's vocabulary (xgrammar's
  ``TokenizerInfo``, a few seconds for Qwen3's 152k tokens) is built there too, at the first constrained
  request, against the model's padded vocabulary: ids past the tokenizer's (151,669..151,935 for Qwen3) are
  never allowed.
- **Matchers** advance when a step's sampled ids become known tokens (``LLMEngine._finish``, right after
  ``Scheduler.apply``), so a matcher's state is always that of the sequence's known output. Preemption by
  recompute keeps the output, so it keeps the matcher too; abort and finish drop it.
- **The bitmask** of a step ([S, ceil(V / 32)] int32, one row per sampling row) is filled on the host, for
  the rows whose constraint is active, after the step's forward pass has been queued on the device and the
  step before has been applied (``LLMEngine.step``). It is filled on a worker thread (``start_mask``:
  xgrammar's batch fill releases the GIL), so the engine thread meanwhile builds the step's sampling batch,
  returns its outputs and schedules the next step; it joins the fill only to queue the sampler, just before
  it launches the next forward pass. ``Sampler`` applies the mask as one masked operation
  (``xgr.apply_token_bitmask_inplace`` on the constrained rows).

Qwen3 thinking: where the prompt leaves thinking open (``ThinkingTokens.leaves_thinking_open``), the
constraint starts after the model's ``</think>`` token; ``OutputConstraint.from_first_token`` starts it at
once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine_service.constraints import ConstraintKind, OutputConstraint
from qwen3.forward_batch import copy_to_device
from service_common.validation import FieldError, grammar_compiler_message

if TYPE_CHECKING:
    import xgrammar as xgr

    from engine_service.core.sequence import Sequence

log = logging.getLogger(__name__)


def _xgr() -> Any:
    """xgrammar, imported at the first constrained request: an engine that never gets one neither pays its
    import nor needs it installed (e.g. a benchmark machine without the wheel)."""
    import xgrammar

    return xgrammar


#: Threads compiling grammars (each compile may use xgrammar's own threads too).
COMPILE_WORKERS = 2
#: Threads xgrammar's batch bitmask fill may use (its "auto": half the hardware threads).
FILL_THREADS: int | str = "auto"
#: Memory the compiler's cache of compiled grammars may hold.
COMPILER_CACHE_BYTES = 512 * 2**20
#: Constraints whose compilation (done or in flight) later requests share, most recently used kept. Few: a done
#: one holds its compiled grammar outside the compiler's byte-bounded cache, and the sharing that matters is
#: within a burst of requests with one schema.
SHARED_COMPILATIONS = 16


@dataclass(frozen=True)
class ThinkingTokens:
    """Qwen3's chat-markup ids that say whether a prompt leaves the model's thinking open."""

    think_start: int | None  # <think>
    think_end: int | None  # </think>
    turn_start: int | None  # <|im_start|>
    assistant: tuple[int, ...]  # the ids of "assistant" after <|im_start|>

    def leaves_thinking_open(self, prompt: list[int]) -> bool:
        """Whether the model may think first: reading the prompt backwards, an open ``<think>``, or the start
        of an assistant turn, comes before any ``</think>``. A prompt without chat markup (raw completion)
        or one whose turn already closed its thinking (``enable_thinking=False``) starts the constraint at
        once."""
        if self.think_end is None:
            return False
        for i in range(len(prompt) - 1, -1, -1):
            token = prompt[i]
            if token == self.think_end:
                return False
            if token == self.think_start:
                return True
            if token == self.turn_start:
                return tuple(prompt[i + 1 : i + 1 + len(self.assistant)]) == self.assistant
        return False


def _accept_batch(matchers: list[xgr.GrammarMatcher], tokens: list[int]) -> Collection[int]:
    """Advance ``matchers[i]`` by ``tokens[i]`` in one call into xgrammar; the result holds 1 for each accepted
    token, 0 for each rejected one.

    xgrammar 0.2.9's public ``BatchGrammarMatcher.batch_accept_token`` converts its result to a list one
    element at a time through its FFI: at 256 rows that took 0.38 ms on the development machine, against
    0.14 ms for the core call it wraps (and 0.31 ms for one ``accept_token`` per row), so the core call is
    made here and its result array returned as is. Falls back to the public call where the core is not
    where 0.2.9 keeps it."""
    core = getattr(getattr(_xgr(), "base", None), "_core", None)
    if core is None:
        return _xgr().BatchGrammarMatcher.batch_accept_token(matchers, tokens)  # type: ignore[no-any-return]
    return core.BatchGrammarMatcher.batch_accept_token([m._handle for m in matchers], tokens, False)  # type: ignore[no-any-return]


class SequenceGrammar:
    """One sequence's matcher, and whether it still waits for ``</think>`` before it constrains.

    ``active`` (the next token is constrained: thinking is over and the grammar has not ended) is kept up to
    date by ``accept``, so reading it costs no call into xgrammar: a matcher can only end on one of its stop
    ids, so only those ask it whether it has."""

    def __init__(self, compiled: xgr.CompiledGrammar, think_end: int | None, stop_ids: frozenset[int]) -> None:
        self.matcher = _xgr().GrammarMatcher(compiled)
        self.think_end = think_end  # None: constrained from the first token
        self.stop_ids = stop_ids
        self.active = think_end is None

    def accept(self, token: int) -> bool:
        """Advance by one known output token; False if the grammar rejects it."""
        if self.think_end is not None:
            if token == self.think_end:
                self.think_end, self.active = None, True
            return True
        accepted = bool(self.matcher.accept_token(token))
        if token in self.stop_ids:
            self.active = not self.matcher.is_terminated()
        return accepted


@dataclass
class GrammarMask:
    """A step's token bitmask: which ids each constrained sampling row may take."""

    bitmask: torch.Tensor  # [S, ceil(V / 32)] int32 on the logits' device; bit j of a row: id j allowed
    rows: list[int] | torch.Tensor  # the constrained rows (others' bitmask rows are not read); [R] int32 on CUDA

    def apply(self, scores: torch.Tensor) -> None:
        """scores[row, id] = -inf for every id a constrained row may not take, in place (one kernel: xgrammar's
        Triton kernel on CUDA, its C++ loop on the CPU)."""
        _xgr().apply_token_bitmask_inplace(scores, self.bitmask, vocab_size=scores.shape[1], indices=self.rows)


class GrammarCompilation:
    """The tokenizer's vocabulary, the compiler and its threads: ``submit`` a constraint, get a future."""

    def __init__(self, model_dir: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.model_dir, self.vocab_size, self.eos_token_ids = model_dir, vocab_size, eos_token_ids
        self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self.thinking = ThinkingTokens(None, None, None, ())
        # constraint -> its compilation, shared by every request with that constraint (engine thread only)
        self._shared: OrderedDict[OutputConstraint, Future[xgr.CompiledGrammar]] = OrderedDict()

    def submit(self, constraint: OutputConstraint) -> Future[xgr.CompiledGrammar]:
        """The compilation of ``constraint``: the one already done or in flight for an equal constraint (one of
        the ``SHARED_COMPILATIONS`` most recent), else a new pool job. Sharing is what lets 256 requests with one
        schema start at the next step: each one queued as its own job, they would pass through the pool's
        threads one by one, each waiting for the GIL while the engine thread runs (xgrammar's own cache makes
        the compile itself, not the wait, fast)."""
        future = self._shared.get(constraint)
        if future is None or future.cancelled():
            future = self._shared[constraint] = self._pool.submit(self._compile, constraint)
            if len(self._shared) > SHARED_COMPILATIONS:
                self._shared.popitem(last=False)
        self._shared.move_to_end(constraint)
        return future

    def forget(self, constraint: OutputConstraint) -> None:
        """Drop ``constraint``'s shared compilation (its last waiting request left before it was ready); a
        compilation no request waits for any more is cancelled if it has not started."""
        future = self._shared.pop(constraint, None)
        if future is not None:
            future.cancel()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> xgr.GrammarCompiler:
        """The compiler, built at the first constrained request (in a pool thread, under the lock)."""
        with self._lock:
            if self._compiler is None:
                if not (Path(self.model_dir) / "tokenizer.json").is_file():
                    raise RuntimeError(f"structured output needs the tokenizer files; {self.model_dir} has none")
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
                # vocab_size: the model's (padded) one, so the bitmask covers every logit and the ids past the
                # tokenizer's are masked; stop ids: the model's EOS ids, the only ones a complete grammar allows.
                xgr = _xgr()
                info = xgr.TokenizerInfo.from_huggingface(
                    tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self.eos_token_ids)
                )
                vocab = tokenizer.get_vocab()
                self.thinking = ThinkingTokens(
                    vocab.get("<think>"),
                    vocab.get("</think>"),
                    vocab.get("<|im_start|>"),
                    tuple(tokenizer.encode("assistant", add_special_tokens=False)),
                )
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=True, cache_limit_bytes=COMPILER_CACHE_BYTES)
                log.info("structured output ready: vocabulary of %d ids", info.vocab_size)
            return self._compiler

    def _compile(self, c: OutputConstraint) -> xgr.CompiledGrammar:
        try:
            compiler = self._load()
        except (OSError, RuntimeError, ValueError) as exc:  # no or unreadable tokenizer files
            raise FieldError(c.field, f"structured output is unavailable on this engine: {exc}") from exc
        try:
            if c.kind is ConstraintKind.JSON_SCHEMA:
                return compiler.compile_json_schema(c.spec, any_whitespace=False)
            if c.kind is ConstraintKind.JSON_OBJECT:
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if c.kind is ConstraintKind.REGEX:
                return compiler.compile_regex(c.spec)
            if c.kind is ConstraintKind.GRAMMAR:
                return compiler.compile_grammar(c.spec)
            # A JSON string literal is an EBNF string literal with the same escapes.
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(choice) for choice in c.choices))
        except RuntimeError as exc:  # xgrammar reports every bad schema, regex or grammar so
            raise FieldError(c.field, f"does not compile: {grammar_compiler_message(exc)}") from None


class MaskJob:
    """A step's bitmask being filled on the structured-output worker thread (``StructuredOutputManager.start_mask``)."""

    def __init__(self, future: Future[tuple[torch.Tensor, list[int]]], device: torch.device) -> None:
        self._future, self._device = future, device

    def result(self) -> GrammarMask | None:
        """Wait for the fill, then the mask on the device (the copy is queued, not waited for); None when no
        row's constraint was active. Call on the engine thread: the copy goes to its CUDA stream."""
        host, indices = self._future.result()
        if not indices:
            return None
        if self._device.type == "cpu":
            return GrammarMask(host, indices)
        # The rows as a device tensor copied from pinned memory: a list would make xgrammar copy it from pageable
        # memory, which waits for the device.
        rows = copy_to_device(torch.tensor(indices, dtype=torch.int32), self._device)
        return GrammarMask(copy_to_device(host, self._device), rows)


class StructuredOutputManager:
    """The engine's structured-output state: compilations in flight, one ``SequenceGrammar`` per sequence,
    the host bitmask buffers. Driven by ``LLMEngine`` on the engine loop's thread; only a step's bitmask fill
    runs on the worker thread (``start_mask``), and the engine joins it before any matcher moves again."""

    def __init__(
        self, model_dir: str, vocab_size: int, eos_token_ids: tuple[int, ...], max_num_seqs: int, device: torch.device
    ) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.compilation = GrammarCompilation(model_dir, vocab_size, eos_token_ids)
        # one compilation per request, keyed by its first sample; the value holds all its samples (n > 1)
        self._compiling: dict[Sequence, tuple[list[Sequence], Future[xgr.CompiledGrammar]]] = {}
        self._grammars: dict[Sequence, SequenceGrammar] = {}
        self._batch_matcher: xgr.BatchGrammarMatcher | None = None  # made and used on the fill thread only
        self._fill_pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        # Two host buffers [max_num_seqs, ceil(V / 32)] int32, used in turn (made at the first fill): the copy of
        # step N's mask may still be reading one while the host fills step N+1's (pinned memory on CUDA, so the
        # copy does not wait for the host).
        self._buffer_shape = (max_num_seqs, (vocab_size + 31) // 32)
        self._buffers: list[torch.Tensor] = []
        self._turn = 0

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    def submit(self, samples: list[Sequence]) -> None:
        """Start compiling the constraint of one request's ``samples`` (index order; they share their
        params); ``poll`` says when it is ready. Each sample gets its own matcher then."""
        leader = samples[0]
        assert leader.params.constraint is not None
        self._compiling[leader] = (samples, self.compilation.submit(leader.params.constraint))

    def poll(self, timeout: float = 0.0) -> tuple[list[list[Sequence]], list[tuple[list[Sequence], Exception]]]:
        """Requests (their samples) whose grammar is ready, in submission order, and those whose compilation
        failed with the error. Waits up to ``timeout`` seconds for the first to end when none has."""
        if not self._compiling:
            return [], []
        if timeout > 0:
            wait([f for _, f in self._compiling.values()], timeout, return_when=FIRST_COMPLETED)
        ready, failed = [], []
        for leader, (samples, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[leader]
            exc = future.exception()
            if exc is not None:
                failed.append((samples, exc if isinstance(exc, Exception) else RuntimeError(str(exc))))
                continue
            constraint = leader.params.constraint
            assert constraint is not None
            thinking = self.compilation.thinking
            stop_ids = frozenset(self.compilation.eos_token_ids)
            opens = not constraint.from_first_token and thinking.leaves_thinking_open(leader.prompt_token_ids)
            for seq in samples:
                self._grammars[seq] = SequenceGrammar(future.result(), thinking.think_end if opens else None, stop_ids)
            ready.append(samples)
        return ready, failed

    @property
    def num_grammars(self) -> int:
        """Sequences with a matcher (compiled and not yet finished)."""
        return len(self._grammars)

    def has_grammar(self, seq: Sequence) -> bool:
        return seq in self._grammars

    def accept(self, applied: list[tuple[int, Sequence]], token_ids: list[int]) -> set[int]:
        """Advance the matchers of a step's applied rows (``(row, sequence)``) by their new known tokens
        (``token_ids[row]``); returns the rows whose grammar rejects its token.

        The engine thread runs this for every row of every constrained step, on the path from one step's
        sampled ids to the next step's mask: the rows in the middle of their grammar go to xgrammar in one
        batch call (``_accept_batch``); the rows at a boundary (thinking, a stop id) go through
        ``SequenceGrammar.accept``."""
        rejected: set[int] = set()
        grammars = self._grammars
        batch_rows: list[int] = []
        batch_matchers: list[xgr.GrammarMatcher] = []
        batch_tokens: list[int] = []
        for row, seq in applied:
            grammar = grammars.get(seq)
            if grammar is None:
                continue
            token = token_ids[row]
            if grammar.active and token not in grammar.stop_ids:
                batch_rows.append(row)
                batch_matchers.append(grammar.matcher)
                batch_tokens.append(token)
            elif not grammar.accept(token):
                rejected.add(row)
        if batch_rows:
            accepted = _accept_batch(batch_matchers, batch_tokens)
            if 0 in accepted:  # a membership test the result answers natively; a rejection is a bug anyway
                rejected.update(row for row, ok in zip(batch_rows, accepted) if not ok)
        return rejected

    def release(self, seq: Sequence) -> None:
        """Forget ``seq`` (finished or aborted): its matcher, or its compilation still in flight (cancelled
        when no other waiting request shares it)."""
        self._grammars.pop(seq, None)
        compiling = self._compiling.pop(seq, None)  # only a request's first sample keys a compilation
        if compiling is not None and not compiling[1].done():
            future = compiling[1]
            if all(other is not future for _, other in self._compiling.values()):
                assert seq.params.constraint is not None
                self.compilation.forget(seq.params.constraint)

    def start_mask(self, rows: list[Sequence]) -> MaskJob:
        """Start filling the bitmask of a step whose sampling rows are ``rows`` on the worker thread. The caller
        must not advance a matcher (``accept``) before it has taken the job's ``result``."""
        indices, matchers = [], []
        for i, seq in enumerate(rows):
            grammar = self._grammars.get(seq)
            if grammar is not None and grammar.active:
                indices.append(i)
                matchers.append(grammar.matcher)
        if not indices:
            done: Future[tuple[torch.Tensor, list[int]]] = Future()
            done.set_result((torch.empty(0), []))
            return MaskJob(done, self.device)
        if not self._buffers:
            pin = self.device.type == "cuda"
            self._buffers = [torch.empty(self._buffer_shape, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        host = self._buffers[self._turn][: len(rows)]  # [S, W]
        # Two buffers in turn: when this fill starts, the copy from the other one (the step before) may still be
        # queued, but the one before that has been read (its sampler ran before the step now applied).
        self._turn ^= 1
        job = MaskJob(self._fill_pool.submit(self._fill, matchers, host, indices), self.device)
        # Let the worker take the GIL now: it holds it only to enter xgrammar's fill, which releases it. Without
        # this it would wait for the interpreter's switch interval (5 ms) while this thread runs Python.
        time.sleep(0)
        return job

    def _fill(
        self, matchers: list[xgr.GrammarMatcher], host: torch.Tensor, indices: list[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """(host [S, W], the rows filled): the worker thread's job, kept to one call into xgrammar."""
        if self._batch_matcher is None:
            self._batch_matcher = _xgr().BatchGrammarMatcher(FILL_THREADS)
        self._batch_matcher.batch_fill_next_token_bitmask(matchers, host, indices)
        return host, indices

    def shutdown(self) -> None:
        self.compilation.shutdown()
        self._fill_pool.shutdown(wait=False, cancel_futures=True)
