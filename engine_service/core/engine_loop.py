"""The engine side of the service: apply commands between steps, step while there is work, emit events.

``EngineLoop`` runs in the engine process (``run_engine_process``, what the CLI serves) or in a thread of
the server process (tests, embedding). It speaks only the typed commands and events of
``engine_service.protocol``; every request is named by the internal id the service assigned.

Importing this module does not import torch: the server process names ``run_engine_process`` as the
child's entry point without loading the engine itself (the child imports ``LLMEngine`` when it starts).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from engine_service import protocol
from engine_service.event_codec import encode_event

if TYPE_CHECKING:
    from engine_service.config import EngineConfig
    from engine_service.core.engine import LLMEngine

log = logging.getLogger(__name__)


def validate_stream_interval(stream_interval: int) -> None:
    if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
        raise ValueError(f"stream_interval must be an int >= 1, got {stream_interval!r}")


class EngineLoop:
    """Apply commands, step while there is work, emit events. Returns on stop or death.

    ``next_command(timeout)`` returns a command or None when none arrives within ``timeout`` seconds
    (0: don't wait); ``emit(event)`` hands an event to the service side. ``stream_interval`` N > 1
    sends a request's tokens N at a time (its first token and its final delta at once), so the
    server writes N times fewer stream messages.
    """

    def __init__(
        self,
        engine: LLMEngine,
        next_command: Callable[[float], protocol.Command | None],
        emit: Callable[[protocol.Event], None],
        stream_interval: int = 1,
    ) -> None:
        self.engine, self.next_command, self.emit = engine, next_command, emit
        self.batcher = DeltaBatcher(stream_interval)
        self.kv_events_on = False  # someone subscribes to the prefix cache's events (WatchKvEvents)

    def run(self) -> None:
        try:
            while True:
                if self.engine.dead_reason:  # e.g. a TP worker died while we were idle
                    raise protocol.EngineDeadError(self.engine.dead_reason)
                if not self._apply_commands(wait=not self.engine.has_unfinished_requests()):
                    return
                if self.engine.has_unfinished_requests():
                    outputs = self.batcher.ready(self.engine.step())
                    self._emit_kv_events()  # before the outputs: a finished request's blocks are known first
                    if outputs:
                        self.emit(protocol.StepOutputs(outputs, self.engine.stats()))
                    if embeddings := self.engine.pop_embeddings():
                        self.emit(protocol.EmbeddingsReady(embeddings, self.engine.stats()))
                    if failed := self.engine.take_failed():  # e.g. a grammar that does not compile
                        for internal_id, exc in failed:
                            self.emit(protocol.RequestFailed(internal_id, exc))
                        # the load without them: nothing else may report it (no step follows when idle)
                        self.emit(protocol.StatsUpdate(self.engine.stats()))
        except protocol.EngineDeadError as exc:
            self._emit_held()
            self.emit(protocol.EngineStopped(str(exc), died=True))
        except Exception as exc:  # a bug: report it, fail every stream, never hang them
            log.exception("engine loop crashed")
            self._emit_held()
            self.emit(protocol.EngineStopped(f"engine loop crashed: {exc!r}", died=True))

    def _emit_held(self) -> None:
        """Before the streams end with an error: the tokens they were already given, held back."""
        held = self.batcher.release_all()
        if held:
            self.emit(protocol.StepOutputs(held, self.engine.stats()))

    def _emit_kv_events(self) -> None:
        if not self.kv_events_on:  # nobody subscribes: the block manager records nothing either
            return
        events = self.engine.block_manager.take_events()
        if events:
            self.emit(protocol.KvEvents(events))

    def _apply_commands(self, wait: bool) -> bool:
        """Apply queued commands; False on stop. When idle, waits (in slices) for the first one."""
        applied = False
        while True:
            command = self.next_command(0.5 if wait else 0.0)
            if command is None:
                if applied:
                    self.emit(protocol.StatsUpdate(self.engine.stats()))
                return True
            wait, applied = False, True
            if isinstance(command, protocol.StopEngine):
                self._emit_held()
                self.emit(protocol.EngineStopped("the engine is shutting down", died=False))
                return False
            if isinstance(command, (protocol.AddRequest, protocol.AddEmbedRequest)):
                try:
                    if isinstance(command, protocol.AddRequest):
                        self.engine.add_request(
                            command.internal_id,
                            command.prompt_token_ids,
                            command.params,
                            command.priority,
                            command.cache_salt,
                        )
                    else:
                        self.engine.add_embed_request(command.internal_id, command.prompt_token_ids, command.normalize)
                except Exception as exc:  # delivered to its own stream; others are untouched
                    self.emit(protocol.RequestFailed(command.internal_id, exc))
            elif isinstance(command, protocol.AbortRequest):
                finals = self.engine.abort_request(command.internal_id, command.index)
                if finals:
                    self.emit(protocol.StepOutputs([self.batcher.final(out) for out in finals], self.engine.stats()))
                if command.ticket is not None:
                    self.emit(protocol.AbortAnswered(command.ticket, bool(finals)))
            elif isinstance(command, protocol.WatchKvEvents):
                bm = self.engine.block_manager
                self.kv_events_on = command.subscriber is not None
                bm.record_events(self.kv_events_on)
                if command.subscriber is not None:
                    self._emit_kv_events()  # what happened before the snapshot, for the others
                    self.emit(protocol.KvEvents(bm.snapshot_events(), command.subscriber))
            elif isinstance(command, protocol.FlushCache):
                dropped, kept = self.engine.flush_prefix_cache()
                self._emit_kv_events()
                self.emit(protocol.CacheFlushed(command.ticket, dropped, kept))


class DeltaBatcher:
    """Holds a request's deltas back until ``stream_interval`` tokens are ready, except its first token
    (time to first token is not delayed) and its final delta, which carries everything held. A request
    that gets no token in a step (preempted, waiting to be recomputed) is sent what it holds at once."""

    def __init__(self, stream_interval: int = 1) -> None:
        validate_stream_interval(stream_interval)
        self.stream_interval = stream_interval
        self._held: dict[tuple[str, int], protocol.RequestOutput] = {}  # (internal id, sample) -> tokens not sent yet
        self._started: set[tuple[str, int]] = set()  # samples whose first token was sent

    def ready(self, outputs: list[protocol.RequestOutput]) -> list[protocol.RequestOutput]:
        """Of one engine step's deltas, those to send now; the rest are held for a later step."""
        if self.stream_interval == 1:
            return outputs
        ready = []
        if self._held:  # requests that got nothing this step: what they hold goes now
            stepped = {(out.request_id, out.index) for out in outputs}
            ready += [self._held.pop(key) for key in [key for key in self._held if key not in stepped]]
        for out in outputs:
            key = (out.request_id, out.index)
            if out.finished:
                ready.append(self.final(out))
                continue
            held = self._held.pop(key, None)
            if held is not None:
                held.absorb(out)
                out = held
            if key not in self._started:
                self._started.add(key)
                ready.append(out)
            elif len(out.new_token_ids) < self.stream_interval:
                self._held[key] = out
            else:
                ready.append(out)
        return ready

    def final(self, out: protocol.RequestOutput) -> protocol.RequestOutput:
        """A request's final delta (finished or aborted), carrying whatever it held."""
        key = (out.request_id, out.index)
        self._started.discard(key)
        held = self._held.pop(key, None)
        if held is None:
            return out
        held.absorb(out)
        return held

    def release_all(self) -> list[protocol.RequestOutput]:
        """Every held delta, now (the engine is stopping or died: nothing more will follow them)."""
        held, self._held = list(self._held.values()), {}
        self._started.clear()
        return held


def run_engine_process(
    config: EngineConfig, conn: Connection, log_level: str, log_format: str, stream_interval: int
) -> None:
    """Entry point of the engine process: load, report ready (or the error), run the loop, shut down."""
    from engine_service.core.engine import LLMEngine
    from service_common.logging import configure_logging

    # Ctrl-C in a terminal signals the whole process group: the server decides when the engine stops
    # (after draining its streams) and says so with StopEngine; a SIGINT here would only kill it early.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent while spawning us
    configure_logging(log_level, log_format)  # type: ignore[arg-type]
    try:
        engine = LLMEngine(config)
    except Exception as exc:
        log.exception("engine failed to load")
        conn.send_bytes(encode_event(protocol.EngineLoadFailed(f"{type(exc).__name__}: {exc}")))
        return

    def next_command(timeout: float) -> protocol.Command | None:
        try:
            return conn.recv() if conn.poll(timeout) else None
        except (EOFError, OSError):  # the server process is gone: nobody is left to serve
            log.warning("the server side of the engine pipe closed; shutting down")
            return protocol.StopEngine()

    # Events are encoded here and written by a sender thread: when the server falls behind and the
    # pipe is full, the engine keeps stepping (the server folds the backlog into fewer messages)
    # instead of blocking on the write. The thread holds the interpreter lock only between writes.
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def send_loop() -> None:
        while (data := outbox.get()) is not None:
            try:
                conn.send_bytes(data)
            except (BrokenPipeError, OSError):
                return  # the server is gone; the next command poll turns that into a stop

    def emit(event: protocol.Event) -> None:
        outbox.put(encode_event(event))

    sender = threading.Thread(target=send_loop, name="engine-events", daemon=True)
    sender.start()
    try:
        emit(protocol.EngineReady(engine.info, engine.stats()))
        EngineLoop(engine, next_command, emit, stream_interval).run()
    finally:
        outbox.put(None)
        sender.join(30)  # deliver the last events (the final deltas, EngineStopped) before exiting
        engine.shutdown()
