"""The host gate on CUDA (``engine_service.core.host_gate``; skipped with the reason on CPU machines): work queued
behind a gate waits for the host's signal, sees the data written before it, and a gate never opened gives up."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from engine_service.core.host_gate import HostGate  # noqa: E402


def test_work_behind_a_gate_waits_for_the_host_and_reads_what_it_wrote() -> None:
    gate = HostGate(torch.device("cuda"))
    host = torch.zeros(4096, dtype=torch.int32, pin_memory=True)  # [N], written by the host before it opens
    device = torch.empty(4096, dtype=torch.int32, device="cuda")
    for _ in range(3):
        ticket = gate.next_ticket()
        gate.wait(ticket)
        device.copy_(host, non_blocking=True)  # queued behind the gate
        done = torch.cuda.Event()
        done.record()
        time.sleep(0.05)
        assert not done.query(), "the copy ran before the gate was opened"
        host.fill_(ticket)
        gate.open(ticket)
        done.synchronize()
        assert bool((device == ticket).all())
    assert int(gate.timeouts.item()) == 0


def test_a_gate_never_opened_gives_up_and_counts_it() -> None:
    gate = HostGate(torch.device("cuda"), max_spins=10_000)
    gate.wait(gate.next_ticket())
    torch.cuda.synchronize()
    assert int(gate.timeouts.item()) == 1


def test_open_all_lets_queued_and_later_gates_pass() -> None:
    gate = HostGate(torch.device("cuda"))
    gate.wait(gate.next_ticket())
    gate.open_all()
    gate.wait(gate.next_ticket())
    torch.cuda.synchronize()
    assert int(gate.timeouts.item()) == 0
