"""The service side of the engine's prefix cache: KV-event subscriptions and flushes; torch-free.

The block manager records what enters and leaves the prefix cache only while someone listens: the first
subscriber turns recording on (``WatchKvEvents``), the last one to leave turns it off, so an engine nobody
watches pays one attribute test per cached block. Each step's events reach here once, as one ``KvEvents``,
and are fanned out to every subscriber.

**Subscribers never slow the engine.** Each has a bounded queue (``max_batches`` step batches). A new
subscriber first gets a snapshot of the whole cache (``AllBlocksCleared``, then every reachable block);
live batches that arrive before its snapshot are already in it and are skipped. When a subscriber's
queue is full (it reads slower than the engine steps), its backlog is dropped and it is resynced: it gets
a fresh snapshot, which again starts with ``AllBlocksCleared``, so what it rebuilds is exact, and nothing
waits on it meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from engine_service.protocol import (
    CacheFlushed,
    Command,
    EngineDeadError,
    FlushCache,
    KvCacheEvent,
    KvEvents,
    WatchKvEvents,
)

log = logging.getLogger(__name__)

#: Step batches a subscriber may have queued before it is resynced (a step stores a few blocks per request).
MAX_QUEUED_BATCHES = 1024


class KvSubscription:
    """One subscriber's stream of event batches (use as an async context manager, or ``close`` it)."""

    def __init__(self, link: PrefixCacheLink, subscriber: int, max_batches: int) -> None:
        self.link, self.id = link, subscriber
        self.queue: asyncio.Queue[list[KvCacheEvent]] = asyncio.Queue(max_batches)
        self.awaiting_snapshot = True  # live batches before the snapshot are in it: skipped
        self.resyncs = 0  # times its backlog was dropped for a fresh snapshot

    async def next_batch(self, timeout: float) -> list[KvCacheEvent] | None:
        """The events queued so far, oldest first, as one batch (a slow reader gets fewer, larger
        batches); None if none came within ``timeout`` seconds."""
        try:
            events = list(await asyncio.wait_for(self.queue.get(), timeout))
        except asyncio.TimeoutError:
            return None
        while not self.queue.empty():
            events += self.queue.get_nowait()
        return events

    def deliver(self, event: KvEvents) -> None:
        if event.subscriber == self.id:
            self.awaiting_snapshot = False
        elif event.subscriber is not None or self.awaiting_snapshot:
            return  # another subscriber's snapshot, or live events its own coming snapshot holds
        try:
            self.queue.put_nowait(event.events)
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.awaiting_snapshot = True
            self.resyncs += 1
            log.warning("KV-event subscriber %d fell %d batches behind; resyncing it", self.id, self.queue.maxsize)
            self.link.send(WatchKvEvents(self.id))

    def close(self) -> None:
        self.link.unsubscribe(self)

    async def __aenter__(self) -> KvSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class PrefixCacheLink:
    """Subscriptions to the engine's KV events and the flush command, for one ``AsyncEngine``."""

    def __init__(self, send: Callable[[Command], None], max_batches: int = MAX_QUEUED_BATCHES) -> None:
        self.send = send
        self.max_batches = max_batches
        self._subscribers: dict[int, KvSubscription] = {}
        self._ids = itertools.count(1)
        self._flushes: dict[int, asyncio.Future[CacheFlushed]] = {}
        self._tickets = itertools.count()
        self.dead_reason: str | None = None

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> KvSubscription:
        """A new subscription; its first batch is a snapshot of the whole cache."""
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        sub = KvSubscription(self, next(self._ids), self.max_batches)
        self._subscribers[sub.id] = sub
        self.send(WatchKvEvents(sub.id))
        return sub

    def unsubscribe(self, sub: KvSubscription) -> None:
        if self._subscribers.pop(sub.id, None) is not None and not self._subscribers and not self.dead_reason:
            self.send(WatchKvEvents(None))  # nobody listens: the block manager stops recording

    async def flush(self) -> CacheFlushed:
        """Drop every cached block no live request holds (subscribers get ``AllBlocksCleared`` and what is
        left). Raises EngineDeadError if the engine is down."""
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        ticket = next(self._tickets)
        done: asyncio.Future[CacheFlushed] = asyncio.get_running_loop().create_future()
        self._flushes[ticket] = done
        self.send(FlushCache(ticket))
        return await done

    def on_event(self, event: KvEvents | CacheFlushed) -> None:
        """An engine event, on the event loop."""
        if isinstance(event, KvEvents):
            for sub in list(self._subscribers.values()):
                sub.deliver(event)
        else:
            waiter = self._flushes.pop(event.ticket, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event)

    def fail(self, reason: str) -> None:
        """The engine died: pending flushes fail (subscribers see it through the engine's load)."""
        self.dead_reason = reason
        for waiter in self._flushes.values():
            if not waiter.done():
                waiter.set_exception(EngineDeadError(reason))
        self._flushes.clear()
