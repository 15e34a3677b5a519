"""Where an ``AsyncEngine``'s engine loop runs: a thread of this process (``ThreadDriver``) or a child
process (``ProcessDriver``, what the CLI serves). Each starts the loop and returns the function that sends it
commands; events come back to the event loop. Torch-free (the child process imports the engine core itself).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine_service.core.engine_loop import EngineLoop, run_engine_process
from engine_service.event_codec import decode_event
from engine_service.protocol import (
    Command,
    EngineLoadFailed,
    EngineReady,
    EngineStopped,
    Event,
    StopEngine,
)

if TYPE_CHECKING:
    from engine_service.config import EngineConfig
    from engine_service.core.engine import LLMEngine

log = logging.getLogger(__name__)


class ThreadDriver:
    def __init__(self, engine: LLMEngine, stream_interval: int) -> None:
        self.engine, self.stream_interval = engine, stream_interval
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, emit: Callable[[Event], None]) -> Callable[[Command], None]:
        """Start the engine thread; events reach the event loop through ``emit`` (thread-safe)."""

        def next_command(timeout: float) -> Command | None:
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


class ProcessDriver:
    """The engine in a spawned child process, over a duplex pipe. Events are read on the event loop
    itself, as soon as the pipe is readable: a reader thread would have to win the interpreter lock
    from the busy event loop for every message (a 5 ms switch interval each), and the child, blocked
    on a full pipe, would run at that pace. Commands go through a sender thread, so a full pipe never
    blocks the event loop. The child's death shows as end-of-file on the pipe."""

    def __init__(self, config: EngineConfig, log_level: str, log_format: str, stream_interval: int) -> None:
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child_conn = ctx.Pipe(duplex=True)
        # Not a daemon: the engine spawns its own tensor-parallel workers, which daemons may not.
        self._process = ctx.Process(
            target=run_engine_process,
            args=(config, child_conn, log_level, log_format, stream_interval),
            name="qwen3-engine",
            daemon=False,
        )
        # SIGINT stays blocked while the child starts (it inherits this thread's mask), so a Ctrl-C during
        # its imports cannot kill it either; run_engine_process ignores SIGINT, then unblocks it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child_conn.close()
        try:
            first = decode_event(self._conn.recv_bytes())
        except EOFError:
            self._process.join(5)
            code = self._process.exitcode
            raise RuntimeError(f"the engine process exited while loading (exit code {code})") from None
        if isinstance(first, EngineLoadFailed):
            self._process.join(30)
            raise RuntimeError(first.reason)  # the child's error, e.g. "ConfigError: ...: config field ..."
        assert isinstance(first, EngineReady), first
        self.info, self.stats = first.info, first.stats
        self._outbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None

    def start(self, on_loop: Callable[[Event], None], loop: asyncio.AbstractEventLoop) -> Callable[[Command], None]:
        """Start moving commands and events; events are handed to ``on_loop`` on the event loop."""

        def send_loop() -> None:
            while True:
                command = self._outbox.get()
                try:
                    self._conn.send(command)
                except (OSError, EOFError, BrokenPipeError):
                    return  # the receiver reports the death
                if isinstance(command, StopEngine):
                    return

        def on_readable() -> None:
            try:
                while self._conn.poll():  # every whole message waiting; a message is written in one go
                    event = decode_event(self._conn.recv_bytes())
                    on_loop(event)
                    if isinstance(event, EngineStopped):
                        loop.remove_reader(self._conn.fileno())
                        return
            except (EOFError, OSError):
                loop.remove_reader(self._conn.fileno())
                self._process.join(1)
                on_loop(EngineStopped(f"the engine process exited (exit code {self._process.exitcode})", died=True))

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
