"""A gate in a CUDA stream that a host thread opens: the work queued behind it runs once the host says so.

Why (docs/ARCHITECTURE.md, "structured output"): a step with constrained rows samples with a token bitmask
that the host fills from the step before's tokens while the device runs this step's forward pass. Queued
only once the mask is filled, the sampler and the next forward pass would wait for the host's whole path
(wait for the ids, apply them, advance the matchers, fill, queue the sampler, launch the next forward pass),
and the device would idle for it every step. Instead they are queued at once, behind a gate: a one-thread
kernel that spins on a counter in pinned host memory until the fill's thread writes the step's ticket there.

Pinned memory allocated through CUDA (``torch.empty(..., pin_memory=True)``) is mapped into the device's
address space under unified virtual addressing, so the kernel reads the host's counter directly; a volatile
load goes over the bus each time (about a microsecond), and the host's write is seen by the next one.
Tickets only grow, so a late gate never waits for a ticket already given.

A gate the host never opens would stall the stream for good: ``open_all`` opens every gate (the engine calls
it when it fails or shuts down), and the kernel gives up after ``max_spins`` loads (about ten seconds) and
counts that in ``timeouts`` (a device int32), so a lost signal degrades into a stale mask, which the
matchers then reject as a broken grammar, never into a hung GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Loads of the host counter before a gate gives up (~1 us each over PCIe: about ten seconds).
MAX_SPINS = 10_000_000
_ALL_OPEN = 2**62


@triton.jit(do_not_specialize=["ticket", "max_spins"])
def _gate_kernel(counter_ptr, ticket, max_spins, timeouts_ptr):
    seen = tl.load(counter_ptr, volatile=True)
    spins = 0
    while (seen < ticket) & (spins < max_spins):
        seen = tl.load(counter_ptr, volatile=True)
        spins += 1
    if seen < ticket:
        tl.atomic_add(timeouts_ptr, 1)


class HostGate:
    """Numbered gates on one CUDA device's streams, opened in ticket order by a host thread.

    ``next_ticket`` (engine thread) numbers a gate; ``wait(ticket)`` queues it on the current stream;
    ``open(ticket)`` (any thread, e.g. the mask fill's) lets every gate up to ``ticket`` pass."""

    def __init__(self, device: torch.device, max_spins: int = MAX_SPINS) -> None:
        if device.type != "cuda":
            raise ValueError(f"a host gate needs a CUDA device, got {device}")
        self.device, self.max_spins = device, max_spins
        self._counter = torch.zeros(1, dtype=torch.int64, pin_memory=True)  # [1], read by the gate kernel
        self._counter_view = self._counter.numpy()  # written through numpy: no torch dispatch on the signal path
        self.timeouts = torch.zeros(1, dtype=torch.int32, device=device)  # [1], gates that gave up
        self._issued = 0

    def next_ticket(self) -> int:
        self._issued += 1
        return self._issued

    def wait(self, ticket: int) -> None:
        """Queue the gate for ``ticket`` on the current stream: what is queued after it runs once it is open."""
        _gate_kernel[(1,)](self._counter, ticket, self.max_spins, self.timeouts, num_warps=1)

    def open(self, ticket: int) -> None:
        """Let the gates up to ``ticket`` pass (after the data they guard is written)."""
        if ticket > self._counter_view[0]:
            self._counter_view[0] = ticket

    def open_all(self) -> None:
        """Let every gate pass, queued or to come (the engine is failing or shutting down)."""
        self._counter_view[0] = _ALL_OPEN
