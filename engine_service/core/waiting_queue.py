"""The scheduler's waiting queue: sequences ordered by (priority, arrival), a binary heap.

A sequence's place is its ``Sequence.queue_key``: (priority, arrival order, sample index). Lower
priority values come first (vLLM's convention); equal priorities are first come, first served, and the
samples of one request keep their index order. A preempted sequence goes back with its original key, so
among equal priorities it is resumed before anything that arrived after it.

Costs: ``push`` and ``pop`` are O(log n), ``peek`` is O(1) amortised, ``remove`` (a waiting request
aborted) is O(1): the entry is forgotten and skipped when it reaches the top (lazy deletion), so a
whole queue aborted at shutdown costs O(n log n), not O(n^2).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from engine_service.core.sequence import Sequence


class WaitingQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, int, int], int, Sequence]] = []
        self._live: dict[Sequence, int] = {}  # member -> the push number of its current heap entry
        self._pushes = 0

    def __len__(self) -> int:
        return len(self._live)

    def __bool__(self) -> bool:
        return bool(self._live)

    def __contains__(self, seq: object) -> bool:
        return seq in self._live

    def __iter__(self) -> Iterator[Sequence]:
        """The members, in no particular order (checks and stats)."""
        return iter(self._live)

    def push(self, seq: Sequence) -> None:
        if seq in self._live:
            raise ValueError(f"{seq.request_id}[{seq.index}] is already waiting")
        self._pushes += 1
        self._live[seq] = self._pushes
        heapq.heappush(self._heap, (seq.queue_key, self._pushes, seq))

    def peek(self) -> Sequence:
        """The first sequence (IndexError when empty)."""
        heap = self._heap
        while heap and self._live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)  # removed since it was pushed
        return heap[0][2]

    def pop(self) -> Sequence:
        seq = self.peek()
        heapq.heappop(self._heap)
        del self._live[seq]
        return seq

    def remove(self, seq: Sequence) -> None:
        """Forget ``seq`` (ValueError if it is not waiting); its heap entry is dropped when it surfaces."""
        if self._live.pop(seq, None) is None:
            raise ValueError(f"{seq.request_id}[{seq.index}] is not waiting")
        if not self._live:
            self._heap.clear()
