"""Drives the synchronous ``LLMEngine`` off the event loop and exposes it to asyncio.

Two halves talk through commands (add, abort, stop) and events (outputs, errors, abort results, death):

- ``EngineLoop`` is the engine side: it applies commands between steps and emits each step's outputs.
- ``AsyncEngine`` is the event-loop side: handlers get their request's deltas from a per-request
  ``asyncio.Queue``; the event loop never waits on the GPU.

The engine side runs either in a **child process** (``AsyncEngine.in_process``, what the CLI serves):
the GPU loop's Python work (scheduling, input preparation, sampling bookkeeping) then never competes
with gRPC for one interpreter lock, which at hundreds of streams halved throughput in a thread; or in
a **thread** of this process (``AsyncEngine.in_thread``: tests, embedding an engine object you
already hold). Abort is a command (a running step cannot be interrupted), so a cancelled stream's KV
blocks return to the pool before the engine's next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import pickle
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from engine_service.config import EngineConfig
from engine_service.engine import EngineDeadError, EngineInfo, EngineStats, LLMEngine, RequestOutput
from engine_service.sampling_params import SamplingParams
from engine_service.sequence import FinishReason

log = logging.getLogger(__name__)


# ---- commands (to the engine) and events (from it); all picklable ---------------------------------
@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class _Abort:
    request_id: str
    ticket: int | None  # answered by an ("aborted", ticket, found) event when not None


@dataclass(frozen=True)
class _Stop:
    pass


Event = tuple  # ("outputs", [RequestOutput], EngineStats) | ("error", request_id, Exception)
#                | ("aborted", ticket, bool) | ("stats", EngineStats) | ("dead", reason) | ("stopped", reason)
#                | ("tokens", [request_id], [count], [token_id], [RequestOutput], EngineStats): "outputs" on the pipe


def _pack(event: Event) -> Event:
    """The pipe form of an event: a step's plain deltas (tokens only, not final) as flat lists, which
    pickle in microseconds where 256 ``RequestOutput`` objects took about a millisecond on each side."""
    if event[0] != "outputs":
        return event
    _, outputs, stats = event
    ids, counts, tokens, others = [], [], [], []
    for out in outputs:
        if not out.finished and out.new_logprobs is None:
            ids.append(out.request_id)
            counts.append(len(out.new_token_ids))
            tokens += out.new_token_ids
        else:
            others.append(out)
    return ("tokens", ids, counts, tokens, others, stats)


def _unpack(event: Event) -> Event:
    if event[0] != "tokens":
        return event
    _, ids, counts, tokens, others, stats = event
    outputs, start = [], 0
    for rid, count in zip(ids, counts):
        outputs.append(RequestOutput(rid, tokens[start:start + count]))
        start += count
    return ("outputs", outputs + others, stats)


class EngineLoop:
    """The engine side: apply commands, step while there is work, emit events. Returns on stop or death.

    ``next_command(timeout)`` returns a command or None when none arrives within ``timeout`` seconds
    (0: don't wait); ``emit(event)`` hands an event to the event-loop side. ``stream_interval`` N > 1
    sends a request's tokens N at a time (its first token and its final delta at once), so the
    server writes N times fewer stream messages.
    """

    def __init__(self, engine: LLMEngine, next_command: Callable[[float], object | None],
                 emit: Callable[[Event], None], stream_interval: int = 1) -> None:
        self.engine, self.next_command, self.emit = engine, next_command, emit
        self.batcher = DeltaBatcher(stream_interval)

    def run(self) -> None:
        try:
            while True:
                if self.engine.dead_reason:  # e.g. a TP worker died while we were idle
                    raise EngineDeadError(self.engine.dead_reason)
                if not self._apply_commands(wait=not self.engine.has_unfinished_requests()):
                    return
                if self.engine.has_unfinished_requests():
                    outputs = self.batcher.ready(self.engine.step())
                    if outputs:
                        self.emit(("outputs", outputs, self.engine.stats()))
        except EngineDeadError as exc:
            self._emit_held()
            self.emit(("dead", str(exc)))
        except Exception as exc:  # a bug: report it, fail every stream, never hang them
            log.exception("engine loop crashed")
            self._emit_held()
            self.emit(("dead", f"engine loop crashed: {exc!r}"))

    def _emit_held(self) -> None:
        """Before the streams end with an error: the tokens they were already given, held back."""
        held = self.batcher.release_all()
        if held:
            self.emit(("outputs", held, self.engine.stats()))

    def _apply_commands(self, wait: bool) -> bool:
        """Apply queued commands; False on stop. When idle, waits (in slices) for the first one."""
        applied = False
        while True:
            command = self.next_command(0.5 if wait else 0.0)
            if command is None:
                if applied:
                    self.emit(("stats", self.engine.stats()))
                return True
            wait, applied = False, True
            if isinstance(command, _Stop):
                self._emit_held()
                self.emit(("stopped", "the engine is shutting down"))
                return False
            if isinstance(command, _Add):
                try:
                    self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
                except Exception as exc:  # delivered to its own stream; others are untouched
                    self.emit(("error", command.request_id, exc))
            elif isinstance(command, _Abort):
                out = self.engine.abort_request(command.request_id)
                if out is not None:
                    self.emit(("outputs", [self.batcher.final(out)], self.engine.stats()))
                if command.ticket is not None:
                    self.emit(("aborted", command.ticket, out is not None))


def validate_stream_interval(stream_interval: int) -> None:
    if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
        raise ValueError(f"stream_interval must be an int >= 1, got {stream_interval!r}")


class DeltaBatcher:
    """Holds a request's deltas back until ``stream_interval`` tokens are ready, except its first token
    (time to first token is not delayed) and its final delta, which carries everything held. A request
    that gets no token in a step (preempted, waiting to be recomputed) is sent what it holds at once."""

    def __init__(self, stream_interval: int = 1) -> None:
        validate_stream_interval(stream_interval)
        self.stream_interval = stream_interval
        self._held: dict[str, RequestOutput] = {}   # request id -> tokens not sent yet
        self._started: set[str] = set()             # requests whose first token was sent

    def ready(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Of one engine step's deltas, those to send now; the rest are held for a later step."""
        if self.stream_interval == 1:
            return outputs
        ready = []
        if self._held:  # requests that got nothing this step: what they hold goes now
            stepped = {out.request_id for out in outputs}
            ready += [self._held.pop(rid) for rid in [rid for rid in self._held if rid not in stepped]]
        for out in outputs:
            rid = out.request_id
            if out.finished:
                ready.append(self.final(out))
                continue
            held = self._held.pop(rid, None)
            if held is not None:
                held.absorb(out)
                out = held
            if rid not in self._started:
                self._started.add(rid)
                ready.append(out)
            elif len(out.new_token_ids) < self.stream_interval:
                self._held[rid] = out
            else:
                ready.append(out)
        return ready

    def final(self, out: RequestOutput) -> RequestOutput:
        """A request's final delta (finished or aborted), carrying whatever it held."""
        self._started.discard(out.request_id)
        held = self._held.pop(out.request_id, None)
        if held is None:
            return out
        held.absorb(out)
        return held

    def release_all(self) -> list[RequestOutput]:
        """Every held delta, now (the engine is stopping or died: nothing more will follow them)."""
        held, self._held = list(self._held.values()), {}
        self._started.clear()
        return held


class AsyncEngine:
    """The event-loop side. Build with :meth:`in_thread` or :meth:`in_process`, then :meth:`start`."""

    def __init__(self, info: EngineInfo, stats: EngineStats) -> None:
        self.info = info
        self.stats = stats
        #: the engine object when it runs in a thread of this process (tests inspect it); None in process mode
        self.engine: LLMEngine | None = None
        self.dead_reason: str | None = None
        self.on_death: Callable[[str], None] | None = None  # called on the event loop
        self._streams: dict[str, asyncio.Queue] = {}
        self._abort_waiters: dict[int, asyncio.Future] = {}
        self._tickets = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send: Callable[[object], None] = _not_started
        self._driver: _ThreadDriver | _ProcessDriver | None = None

    @classmethod
    def in_thread(cls, engine: LLMEngine, stream_interval: int = 1) -> AsyncEngine:
        """Drive ``engine`` from a thread of this process (``stream_interval``: see ``EngineLoop``)."""
        validate_stream_interval(stream_interval)
        self = cls(engine.info, engine.stats())
        self.engine = engine
        self._driver = _ThreadDriver(engine, stream_interval)
        return self

    @classmethod
    def in_process(cls, config: EngineConfig, log_level: str = "INFO", log_format: str = "kv",
                   stream_interval: int = 1) -> AsyncEngine:
        """Load the engine in a child process (blocking until it is ready: call it off the event loop).
        Raises RuntimeError with the child's error if loading fails."""
        validate_stream_interval(stream_interval)
        driver = _ProcessDriver(config, log_level, log_format, stream_interval)
        self = cls(driver.info, driver.stats)
        self._driver = driver
        return self

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        assert self._driver is not None
        if isinstance(self._driver, _ThreadDriver):
            self._send = self._driver.start(self._post_event)
        else:
            self._send = self._driver.start(self._on_event, self._loop)

    async def stop(self) -> None:
        if self._driver is not None:
            self._send(_Stop())
            await asyncio.to_thread(self._driver.join)
            self._driver = None

    # ---- requests ---------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas. Raises ValueError (bad request), EngineOverloadedError, EngineDeadError.

        Closing the iterator early (client cancel, deadline) aborts the request in the engine.
        """
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.info.validate(prompt_token_ids, params)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._send(_Add(request_id, list(prompt_token_ids), params))
        finished = False
        try:
            while True:
                item = _merge_ready(await stream.get(), stream)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and not self.dead_reason:
                self._send(_Abort(request_id, None))

    async def abort(self, request_id: str) -> bool:
        """Abort a live request; False if no such request is running or waiting."""
        if request_id not in self._streams or self.dead_reason:
            return False
        ticket = next(self._tickets)
        done = asyncio.get_running_loop().create_future()
        self._abort_waiters[ticket] = done
        self._send(_Abort(request_id, ticket))
        return await done

    # ---- events, on the event loop ----------------------------------------------------------
    def _post_event(self, event: Event) -> None:
        """Called from the driver's thread: hand the event to the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_event, event)

    def _on_event(self, event: Event) -> None:
        kind = event[0]
        if kind == "outputs":
            _, outputs, self.stats = event
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put_nowait(out)
        elif kind == "stats":
            self.stats = event[1]
        elif kind == "error":
            stream = self._streams.get(event[1])
            if stream is not None:
                stream.put_nowait(event[2])
        elif kind == "aborted":
            waiter = self._abort_waiters.pop(event[1], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(event[2])
        elif kind in ("dead", "stopped"):
            self._fail_all(event[1], died=kind == "dead")

    def _fail_all(self, reason: str, died: bool) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        for stream in self._streams.values():
            stream.put_nowait(EngineDeadError(reason))
        for waiter in self._abort_waiters.values():
            if not waiter.done():
                waiter.set_result(False)
        self._abort_waiters.clear()
        if died and self.on_death is not None:
            self.on_death(reason)


def _not_started(command: object) -> None:
    raise EngineDeadError("the engine has not been started")


def _merge_ready(item: RequestOutput | BaseException, stream: asyncio.Queue) -> RequestOutput | BaseException:
    """Fold deltas that queued up while the consumer was busy into one.

    When the event loop falls behind the engine (hundreds of streams, a slow client), this turns N
    one-token messages into one N-token message instead of letting the backlog grow: throughput is
    kept, and no token is lost or reordered. An error or the final delta ends the fold.
    """
    while isinstance(item, RequestOutput) and not item.finished and not stream.empty():
        nxt = stream.get_nowait()
        if isinstance(nxt, BaseException):
            stream.put_nowait(nxt)  # errors are terminal (nothing follows them): deliver it on the next read
            break
        item.absorb(nxt)
    return item


# ---- drivers: where the engine loop runs ----------------------------------------------------------
class _ThreadDriver:
    def __init__(self, engine: LLMEngine, stream_interval: int) -> None:
        self.engine, self.stream_interval = engine, stream_interval
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, emit: Callable[[Event], None]) -> Callable[[object], None]:
        """Start the engine thread; events reach the event loop through ``emit`` (thread-safe)."""

        def next_command(timeout: float) -> object | None:
            try:
                return self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait()
            except queue.Empty:
                return None

        loop = EngineLoop(self.engine, next_command, emit, self.stream_interval)
        self._thread = threading.Thread(target=loop.run, name="engine-loop", daemon=True)
        self._thread.start()
        return self._commands.put

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(30)
        self.engine.shutdown()


class _ProcessDriver:
    """The engine in a spawned child process, over a duplex pipe. Events are read on the event loop
    itself, as soon as the pipe is readable: a reader thread would have to win the interpreter lock
    from the busy event loop for every message (a 5 ms switch interval each), and the child, blocked
    on a full pipe, would run at that pace. Commands go through a sender thread, so a full pipe never
    blocks the event loop. The child's death shows as end-of-file on the pipe."""

    def __init__(self, config: EngineConfig, log_level: str, log_format: str, stream_interval: int) -> None:
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child_conn = ctx.Pipe(duplex=True)
        # Not a daemon: the engine spawns its own tensor-parallel workers, which daemons may not.
        self._process = ctx.Process(target=_engine_process_main,
                                    args=(config, child_conn, log_level, log_format, stream_interval),
                                    name="qwen3-engine", daemon=False)
        self._process.start()
        child_conn.close()
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the engine process exited while loading (exit code {self._process.exitcode})") from None
        if message[0] != "ready":
            self._process.join(30)
            raise RuntimeError(message[1])  # the child's error, e.g. "ConfigError: ...: config field ..."
        _, self.info, self.stats = message
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender: threading.Thread | None = None

    def start(self, on_loop: Callable[[Event], None], loop: asyncio.AbstractEventLoop) -> Callable[[object], None]:
        """Start moving commands and events; events are handed to ``on_loop`` on the event loop."""

        def send_loop() -> None:
            while True:
                command = self._outbox.get()
                try:
                    self._conn.send(command)
                except (OSError, EOFError, BrokenPipeError):
                    return  # the receiver reports the death
                if isinstance(command, _Stop):
                    return

        def on_readable() -> None:
            try:
                while self._conn.poll():  # every whole message waiting; a message is written in one go
                    event = _unpack(self._conn.recv())
                    on_loop(event)
                    if event[0] in ("stopped", "dead"):
                        loop.remove_reader(self._conn.fileno())
                        return
            except (EOFError, OSError):
                loop.remove_reader(self._conn.fileno())
                self._process.join(1)
                on_loop(("dead", f"the engine process exited (exit code {self._process.exitcode})"))

        self._sender = threading.Thread(target=send_loop, name="engine-send", daemon=True)
        self._sender.start()
        loop.add_reader(self._conn.fileno(), on_readable)
        return self._outbox.put

    def join(self) -> None:
        if self._sender is not None:
            self._sender.join(30)
        self._process.join(30)
        if self._process.is_alive():
            log.warning("engine process did not exit; terminating it")
            self._process.terminate()
            self._process.join(5)
        self._conn.close()


def _engine_process_main(config: EngineConfig, conn: Connection, log_level: str, log_format: str,
                         stream_interval: int) -> None:
    """Entry point of the engine process: load, report ready (or the error), run the loop, shut down."""
    from service_common.logging import configure_logging

    configure_logging(log_level, log_format)  # type: ignore[arg-type]
    try:
        engine = LLMEngine(config)
    except Exception as exc:
        log.exception("engine failed to load")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return

    def next_command(timeout: float) -> object | None:
        try:
            return conn.recv() if conn.poll(timeout) else None
        except (EOFError, OSError):  # the server process is gone: nobody is left to serve
            log.warning("the server side of the engine pipe closed; shutting down")
            return _Stop()

    # Events are pickled here and written by a sender thread: when the server falls behind and the
    # pipe is full, the engine keeps stepping (the server folds the backlog into fewer messages)
    # instead of blocking on the write. The thread holds the interpreter lock only between writes.
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def send_loop() -> None:
        while (data := outbox.get()) is not None:
            try:
                conn.send_bytes(data)
            except (BrokenPipeError, OSError):
                return  # the server is gone; the next command poll turns that into a stop

    def emit(event: Event) -> None:
        outbox.put(pickle.dumps(_pack(event), protocol=pickle.HIGHEST_PROTOCOL))

    sender = threading.Thread(target=send_loop, name="engine-events", daemon=True)
    sender.start()
    try:
        emit(("ready", engine.info, engine.stats()))
        EngineLoop(engine, next_command, emit, stream_interval).run()
    finally:
        outbox.put(None)
        sender.join(30)  # deliver the last events (the final deltas, "stopped") before exiting
        engine.shutdown()


__all__ = ["AsyncEngine", "EngineLoop", "FinishReason"]
