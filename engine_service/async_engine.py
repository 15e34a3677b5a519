"""The asyncio side of the engine: requests in, per-request streams of deltas out; torch-free.

``AsyncEngine`` talks to an ``EngineLoop`` (``core/engine_loop.py``) through the typed commands and events
of ``engine_service.protocol``. The loop runs in a **child process** (``AsyncEngine.in_process``, what the
CLI serves: the GPU loop's Python work never competes with gRPC for one interpreter lock) or in a
**thread** of this process (``AsyncEngine.in_thread``: tests, embedding an engine object you already hold).

**Request identity.** Every request gets an internal id here, unique for the engine's lifetime; commands
and events carry only that id, and each stream reads the events of its own id. The client's
``request_id`` is a label: it names a *live* request (for Abort and for logs), a second live request with
the same label is refused (``RequestIdInUseError``, after waiting ``LABEL_RELEASE_WAIT_S`` for the first to
end: its client's cancel may still be on the way), and the label is free again the moment its request
ends (finished, cancelled, past its deadline, aborted). A late event of an ended request finds no stream
and is dropped, so it can never reach a new request that reuses the label.

**Parallel samples.** A request with ``params.n > 1`` is one internal id and one stream; the engine core
runs one sequence per sample (identified by (internal id, index)) and tags every delta with its
``index``. The stream ends after the n-th sample's final delta; closing it early aborts every sample.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING

from engine_service.core.engine_loop import validate_stream_interval
from engine_service.engine_drivers import ProcessDriver, ThreadDriver
from engine_service.prefix_cache_link import PrefixCacheLink
from engine_service.protocol import (
    AbortAnswered,
    AbortRequest,
    AddEmbedRequest,
    AddRequest,
    CacheFlushed,
    Command,
    EmbeddingOutput,
    EmbeddingsReady,
    EngineDeadError,
    EngineInfo,
    EngineStats,
    EngineStopped,
    Event,
    KvEvents,
    RequestFailed,
    RequestOutput,
    StatsUpdate,
    StepOutputs,
    StopEngine,
)
from engine_service.sampling_params import SamplingParams
from service_common.validation import FieldError

if TYPE_CHECKING:
    from engine_service.config import EngineConfig
    from engine_service.core.engine import LLMEngine

log = logging.getLogger(__name__)


#: How long a new request waits for a live one with the same label to end before ALREADY_EXISTS.
LABEL_RELEASE_WAIT_S = 0.5


class RequestIdInUseError(ValueError):
    """A live request already carries this request_id (a finished one's id may be reused)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request_id {request_id!r} names a request that is still running")
        self.request_id = request_id


class AsyncEngine:
    """The event-loop side. Build with :meth:`in_thread` or :meth:`in_process`, then :meth:`start`."""

    def __init__(self, info: EngineInfo, stats: EngineStats) -> None:
        self.info = info
        self.stats = stats
        #: the engine object when it runs in a thread of this process (tests inspect it); None in process mode
        self.engine: LLMEngine | None = None
        self.dead_reason: str | None = None
        self.on_death: Callable[[str], None] | None = None  # called on the event loop
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}  # internal id -> its deltas
        self._embeds: dict[str, asyncio.Future[EmbeddingOutput]] = {}  # internal id -> its result
        self._live: dict[str, str] = {}  # client label -> internal id, for live labelled requests
        self._num_samples: dict[str, int] = {}  # internal id -> its n, for live streams (Abort checks an index)
        self._label_released: dict[str, asyncio.Event] = {}  # labels someone waits to reuse -> set when free
        self._ids = itertools.count()
        self._abort_waiters: dict[int, asyncio.Future[bool]] = {}
        self._tickets = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send: Callable[[Command], None] = _not_started
        #: KV-event subscriptions and FlushCache (engine_service/prefix_cache_link.py)
        self.prefix_cache = PrefixCacheLink(lambda command: self._send(command))
        self._driver: ThreadDriver | ProcessDriver | None = None

    @classmethod
    def in_thread(cls, engine: LLMEngine, stream_interval: int = 1) -> AsyncEngine:
        """Drive ``engine`` from a thread of this process (``stream_interval``: see ``EngineLoop``)."""
        validate_stream_interval(stream_interval)
        self = cls(engine.info, engine.stats())
        self.engine = engine
        self._driver = ThreadDriver(engine, stream_interval)
        return self

    @classmethod
    def in_process(
        cls, config: EngineConfig, log_level: str = "INFO", log_format: str = "kv", stream_interval: int = 1
    ) -> AsyncEngine:
        """Load the engine in a child process (blocking until it is ready: call it off the event loop).
        Raises RuntimeError with the child's error if loading fails."""
        validate_stream_interval(stream_interval)
        driver = ProcessDriver(config, log_level, log_format, stream_interval)
        self = cls(driver.info, driver.stats)
        self._driver = driver
        return self

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        assert self._driver is not None
        if isinstance(self._driver, ThreadDriver):
            self._send = self._driver.start(self._post_event)
        else:
            self._send = self._driver.start(self._on_event, self._loop)

    async def stop(self) -> None:
        if self._driver is not None:
            self._send(StopEngine())
            await asyncio.to_thread(self._driver.join)
            self._driver = None

    @property
    def num_live_requests(self) -> int:
        return len(self._streams)

    # ---- requests ---------------------------------------------------------------------------
    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str = "",
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request's deltas (``RequestOutput.request_id`` is the internal id, ``index`` the sample;
        the samples' deltas interleave, each sample ends with its own final delta). Raises
        RequestIdInUseError, EngineOverloadedError, EngineDeadError. Only requests with the same
        ``cache_salt`` share prefix-cache blocks.

        The request is expected to have passed ``EngineInfo.validate`` at the service boundary (the servicers'
        ``generate_request.generate_inputs``), so it is not validated here again; one that did not is refused by
        the engine's admission re-check, and that FieldError is raised from this stream.

        Closing the iterator early (client cancel, deadline) aborts every sample in the engine.
        """
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        if request_id and request_id in self._live:
            await self._wait_for_label(request_id)
        internal_id = str(next(self._ids))
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[internal_id] = stream
        self._num_samples[internal_id] = params.n
        if request_id:
            self._live[request_id] = internal_id
        self._send(AddRequest(internal_id, list(prompt_token_ids), params, priority, cache_salt))
        finished = False
        unfinished = params.n
        try:
            while True:
                for item in _merge_ready(await stream.get(), stream):
                    if isinstance(item, BaseException):
                        finished = True
                        raise item
                    ends_sample = item.finished  # read first: a consumer may edit what it is given
                    yield item
                    if ends_sample:
                        unfinished -= 1
                        if not unfinished:
                            finished = True
                            return
        finally:
            self._streams.pop(internal_id, None)
            self._num_samples.pop(internal_id, None)
            self._release_label(request_id, internal_id)
            if not finished and not self.dead_reason:
                self._send(AbortRequest(internal_id, None))

    async def embed(self, prompt_token_ids: list[int], normalize: bool | None = None) -> EmbeddingOutput:
        """The prompt's embedding (``request_id`` of the result is the internal id). ``normalize`` None: the
        checkpoint's default (``EngineInfo.pooling``). Raises FieldError, EngineOverloadedError, EngineDeadError.
        Embed requests carry no label (Abort does not name them); cancelling the call aborts it in the engine."""
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        self.info.validate_embed(prompt_token_ids)
        internal_id = str(next(self._ids))
        done: asyncio.Future[EmbeddingOutput] = asyncio.get_running_loop().create_future()
        self._embeds[internal_id] = done
        resolved = self.info.pooling.normalize if normalize is None else normalize
        self._send(AddEmbedRequest(internal_id, list(prompt_token_ids), resolved))
        try:
            return await done
        finally:
            self._embeds.pop(internal_id, None)
            if not done.done() and not self.dead_reason:  # cancelled by the caller
                self._send(AbortRequest(internal_id, None))

    def abort_sample(self, internal_id: str, index: int) -> None:
        """End one sample of a live request (a stop string matched in this process); its stream gets the
        sample's ABORTED final delta, the other samples go on."""
        if internal_id in self._streams and not self.dead_reason:
            self._send(AbortRequest(internal_id, None, index))

    async def abort(self, request_id: str, index: int | None = None) -> bool:
        """Abort the live request labelled ``request_id`` (``index`` not None: only that sample of it, the
        others go on); False if none is running or waiting (or that sample already ended). Raises FieldError
        on ``index`` if it is not below the live request's n. Once a whole-request abort returns True the
        label is free for a new request (the old stream still gets its ABORTED end)."""
        internal_id = self._live.get(request_id)
        if internal_id is None or self.dead_reason:
            return False
        n = self._num_samples.get(internal_id, 1)
        if index is not None and index >= n:
            raise FieldError("index", f"must be below the request's n ({n}), got {index}")
        ticket = next(self._tickets)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._abort_waiters[ticket] = done
        self._send(AbortRequest(internal_id, ticket, index))
        found = await done
        if index is None:  # one sample's abort leaves the request (and its label) live until its last sample ends
            self._release_label(request_id, internal_id)
        return found

    def abort_all(self) -> int:
        """Abort every live request (server shutdown after its grace period): each stream ends with its
        ABORTED final delta. Returns how many were asked to stop."""
        if self.dead_reason:
            return 0
        for internal_id in [*self._streams, *self._embeds]:
            self._send(AbortRequest(internal_id, None))
        return len(self._streams) + len(self._embeds)

    async def _wait_for_label(self, request_id: str) -> None:
        """Wait up to ``LABEL_RELEASE_WAIT_S`` for the live request labelled ``request_id`` to end, else raise
        RequestIdInUseError. A client that cancels a stream and at once reuses its id sends the cancel first,
        but the server may run the new call's handler before the old one has seen its cancellation."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LABEL_RELEASE_WAIT_S
        while request_id in self._live:
            remaining = deadline - loop.time()
            released = self._label_released.setdefault(request_id, asyncio.Event())
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(released.wait(), remaining)
            except asyncio.TimeoutError:
                raise RequestIdInUseError(request_id) from None

    def _release_label(self, request_id: str | None, internal_id: str) -> None:
        if request_id and self._live.get(request_id) == internal_id:
            del self._live[request_id]
            released = self._label_released.pop(request_id, None)
            if released is not None:
                released.set()

    # ---- events, on the event loop ----------------------------------------------------------
    def _post_event(self, event: Event) -> None:
        """Called from the driver's thread: hand the event to the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_event, event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, StepOutputs):
            self.stats = event.stats
            for out in event.outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:  # None: the request already ended; its late event is dropped
                    stream.put_nowait(out)
                elif out.finished and out.request_id in self._embeds:  # an Embed aborted (server shutdown)
                    self._resolve(out.request_id, EngineDeadError("the request was aborted: the server is stopping"))
        elif isinstance(event, EmbeddingsReady):
            self.stats = event.stats
            for result in event.outputs:
                self._resolve(result.request_id, result)
        elif isinstance(event, StatsUpdate):
            self.stats = event.stats
        elif isinstance(event, (KvEvents, CacheFlushed)):
            self.prefix_cache.on_event(event)
        elif isinstance(event, RequestFailed):
            stream = self._streams.get(event.internal_id)
            if stream is not None:
                stream.put_nowait(event.error)
            self._resolve(event.internal_id, event.error)
        elif isinstance(event, AbortAnswered):
            waiter = self._abort_waiters.pop(event.ticket, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event.found)
        elif isinstance(event, EngineStopped):
            self._fail_all(event.reason, died=event.died)

    def _fail_all(self, reason: str, died: bool) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        self.prefix_cache.fail(reason)
        for stream in self._streams.values():
            stream.put_nowait(EngineDeadError(reason))
        for internal_id in list(self._embeds):
            self._resolve(internal_id, EngineDeadError(reason))
        for waiter in self._abort_waiters.values():
            if not waiter.done():
                waiter.set_result(False)
        self._abort_waiters.clear()
        if died and self.on_death is not None:
            self.on_death(reason)

    def _resolve(self, internal_id: str, result: EmbeddingOutput | BaseException) -> None:
        """Answer a waiting Embed call (a late answer of an ended one is dropped)."""
        done = self._embeds.get(internal_id)
        if done is None or done.done():
            return
        if isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)


def _not_started(command: Command) -> None:
    raise EngineDeadError("the engine has not been started")


def _merge_ready(
    item: RequestOutput | BaseException, stream: asyncio.Queue[RequestOutput | BaseException]
) -> list[RequestOutput | BaseException]:
    """Fold deltas that queued up while the consumer was busy into one per sample.

    When the event loop falls behind the engine (hundreds of streams, a slow client), this turns N
    one-token messages into one N-token message instead of letting the backlog grow: throughput is
    kept, and no token is lost or reordered within a sample. A sample's final delta ends its fold; an
    error (terminal: nothing follows it) ends the list.
    """
    merged: list[RequestOutput | BaseException] = []
    open_: dict[int, RequestOutput] = {}  # sample index -> its delta still taking later ones
    while True:
        if isinstance(item, BaseException):
            merged.append(item)
            return merged
        held = open_.get(item.index)
        if held is not None:
            held.absorb(item)
        else:
            merged.append(item)
            held = open_[item.index] = item
        if held.finished:
            del open_[item.index]
        if stream.empty():
            return merged
        item = stream.get_nowait()


__all__ = ["AsyncEngine", "RequestIdInUseError"]
