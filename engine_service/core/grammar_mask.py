"""A step's structured-output token bitmask: reserved when the step is launched, filled on a worker thread once
the step before's tokens have advanced the matchers, read by the sampler behind a host gate.

The timeline of step N with constrained rows (docs/ARCHITECTURE.md, "structured output"):

- **launch N** (engine thread): ``MaskFiller.reserve`` gives the step a ``PendingMask`` (its rows with a
  grammar, a host slot, a ticket). The forward pass and the sampler are queued at once; on CUDA the sampler
  reads the mask behind a ``HostGate`` for that ticket (``PendingMask.for_sampler``: the gate, then the copy of
  the host slot to the device, queued on the stream), so the next forward pass is queued behind it too and
  the device never waits for the host's launch. On the CPU, where queued work runs at once, the step
  executor runs the sampler once the fill is done instead.
- **finish N-1** (engine thread): the matchers take step N-1's tokens (``StructuredOutputManager.accept``),
  then ``MaskFiller.fill`` hands the worker thread the rows whose grammar is active (the others' rows allow
  every id). The worker runs xgrammar's batch fill (it releases the GIL) into the host slot, then opens the
  gate, while the device still runs step N's forward pass.

Two host slots are used in turn: when step N+1's fill starts, step N-1's copy has run (its sampler did, and
step N's tokens came after it).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engine_service.core.host_gate import HostGate
from qwen3.forward_batch import copy_to_device

if TYPE_CHECKING:
    import xgrammar as xgr

#: Threads xgrammar's batch bitmask fill may use (its "auto": half the hardware threads).
FILL_THREADS: int | str = "auto"


def xgrammar_module() -> Any:
    """xgrammar, imported at the first constrained request: an engine that never gets one neither pays its
    import nor needs it installed (e.g. a benchmark machine without the wheel)."""
    import xgrammar

    return xgrammar


@dataclass
class GrammarMask:
    """A step's token bitmask as the sampler reads it: which ids each constrained sampling row may take."""

    bitmask: torch.Tensor  # [S, ceil(V / 32)] int32 on the logits' device; bit j of a row: id j allowed
    rows: list[int] | torch.Tensor  # the constrained rows (others' bitmask rows are not read); [R] int32 on CUDA

    def apply(self, scores: torch.Tensor) -> None:
        """scores[row, id] = -inf for every id a constrained row may not take, in place (one kernel: xgrammar's
        Triton kernel on CUDA, its C++ loop on the CPU)."""
        xgrammar_module().apply_token_bitmask_inplace(
            scores, self.bitmask, vocab_size=scores.shape[1], indices=self.rows
        )


@dataclass(eq=False)
class PendingMask:
    """The bitmask of one launched step, reserved at launch and filled later (``MaskFiller.fill``)."""

    rows: list[int]  # the step's sampling rows whose sequence had a grammar at launch
    host: torch.Tensor  # [S, W] int32 host slot (pinned on CUDA), filled by the worker
    ticket: int  # the gate the fill opens (CUDA)
    filler: MaskFiller
    device_rows: torch.Tensor | None = None  # [R] int32 on CUDA: ``rows`` for xgrammar's kernel
    done: Future[None] = field(default_factory=Future)  # the fill: done once filled (or with the fill's error)
    started: bool = False

    def for_sampler(self) -> GrammarMask:
        """The mask for the sampler. CUDA: queues the gate and the copy of the host slot on the current stream,
        without waiting (call it where the sampler is queued); CPU: waits for the fill."""
        if self.device_rows is None:
            self.done.result()
            return GrammarMask(self.host, self.rows)
        filler = self.filler
        assert filler.gate is not None and filler.device_bitmask is not None
        filler.gate.wait(self.ticket)
        bitmask = filler.device_bitmask[: self.host.shape[0]]  # [S, W]
        bitmask.copy_(self.host, non_blocking=True)  # from pinned memory: queued behind the gate
        return GrammarMask(bitmask, self.device_rows)

    def check(self) -> None:
        """Raise the fill's error, if it failed (after the step's results arrived: the fill has ended)."""
        if self.started:
            self.done.result()


class MaskFiller:
    """The host slots, the worker thread that fills them, and on CUDA the gate the fill opens. Used from the
    engine thread; only ``_fill`` runs on the worker."""

    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self._shape = (max_num_seqs, (vocab_size + 31) // 32)
        self._slots: list[torch.Tensor] = []  # two [max_num_seqs, W] int32, made at the first reserve
        self.device_bitmask: torch.Tensor | None = None  # [max_num_seqs, W] int32 on CUDA (stream order guards it)
        self.gate = HostGate(device) if device.type == "cuda" else None
        self._ticket = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._batch_matcher: xgr.BatchGrammarMatcher | None = None  # made and used on the worker only

    def reserve(self, num_rows: int, rows: list[int]) -> PendingMask:
        """A mask for a step of ``num_rows`` sampling rows, ``rows`` of them constrained."""
        if not self._slots:
            pin = self.device.type == "cuda"
            self._slots = [torch.empty(self._shape, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
            if pin:
                self.device_bitmask = torch.empty(self._shape, dtype=torch.int32, device=self.device)
        self._ticket = self.gate.next_ticket() if self.gate is not None else self._ticket + 1
        pending = PendingMask(rows, self._slots[self._ticket % 2][:num_rows], self._ticket, self)
        if self.gate is not None:
            # A device tensor copied from pinned memory: a list would make xgrammar copy it from pageable memory,
            # which waits for the device.
            pending.device_rows = copy_to_device(torch.tensor(rows, dtype=torch.int32), self.device)
        return pending

    def fill(self, pending: PendingMask, active: list[tuple[int, xgr.GrammarMatcher]]) -> None:
        """Start filling ``pending``: each ``(row, matcher)`` of ``active`` from its matcher on the worker thread;
        every other reserved row allows every id. The caller must not advance these matchers before the step's
        results have arrived (the fill has ended by then: the sampler waited for it)."""
        pending.started = True
        active_rows = {row for row, _ in active}
        free = [row for row in pending.rows if row not in active_rows]
        if free:
            pending.host[free] = -1  # all 32 bits set: every id allowed
        if not active:
            self._opened(pending)
            return
        pending.done = self._pool.submit(self._fill, pending, [m for _, m in active], [row for row, _ in active])
        # Let the worker take the GIL now: it holds it only to enter xgrammar's fill, which releases it. Without
        # this it would wait for the interpreter's switch interval (5 ms) while this thread runs Python.
        time.sleep(0)

    def _fill(self, pending: PendingMask, matchers: list[xgr.GrammarMatcher], rows: list[int]) -> None:
        """The worker thread's job: one call into xgrammar, then the gate."""
        try:
            if self._batch_matcher is None:
                self._batch_matcher = xgrammar_module().BatchGrammarMatcher(FILL_THREADS)
            self._batch_matcher.batch_fill_next_token_bitmask(matchers, pending.host, rows)
        finally:  # a failed fill still opens the gate (the engine then raises the error: ``PendingMask.check``)
            if self.gate is not None:
                self.gate.open(pending.ticket)

    def _opened(self, pending: PendingMask) -> None:
        if self.gate is not None:
            self.gate.open(pending.ticket)
        pending.done.set_result(None)

    def open_all(self) -> None:
        """Let every queued sampler pass its gate (the engine is failing or shutting down)."""
        if self.gate is not None:
            self.gate.open_all()

    def shutdown(self) -> None:
        self.open_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
