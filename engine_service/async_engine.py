"""Runs the synchronous ``LLMEngine`` in its own thread and exposes it to asyncio.

The event loop never waits on the GPU: handlers put commands on a thread-safe queue and receive
their request's outputs on a per-request ``asyncio.Queue``, filled by the engine thread through one
``call_soon_threadsafe`` per step. Abort is a command too (a running thread cannot be cancelled), so
a cancelled stream's KV blocks return to the pool at the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine_service.engine import EngineDeadError, EngineStats, LLMEngine, RequestOutput
from engine_service.sampling_params import SamplingParams
from engine_service.sequence import FinishReason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class _Abort:
    request_id: str
    done: asyncio.Future | None  # resolves to True if the request was live


class _Stop:
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.dead_reason: str | None = None
        self.stats: EngineStats = engine.stats()
        self.on_death = None  # optional callback(reason), called on the event loop

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._commands.put(_Stop())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self.engine.shutdown()

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Requests accepted but not finished (running, waiting, or not yet seen by the engine thread)."""
        return len(self._streams)

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
        self.engine.validate(prompt_token_ids, params)  # read-only checks: safe off the engine thread
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(_Add(request_id, list(prompt_token_ids), params))
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
            if not finished:
                self._commands.put(_Abort(request_id, None))

    async def abort(self, request_id: str) -> bool:
        """Abort a live request; False if no such request is running or waiting."""
        if request_id not in self._streams:
            return False
        done = asyncio.get_running_loop().create_future()
        self._commands.put(_Abort(request_id, done))
        return await done

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if self.engine.dead_reason:  # e.g. a TP worker died while we were idle
                    raise EngineDeadError(self.engine.dead_reason)
                idle = not self.engine.has_unfinished_requests()
                if not self._drain_commands(block=idle):
                    return
                if not self.engine.has_unfinished_requests():
                    continue
                outputs = self.engine.step()
                self.stats = self.engine.stats()
                if outputs:
                    self._post(self._deliver, outputs)
        except EngineDeadError as exc:
            self._die(str(exc))
        except Exception as exc:  # a bug: report it, fail every stream, never hang them
            log.exception("engine loop crashed")
            self._die(f"engine loop crashed: {exc!r}")

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; False on stop. Blocks for the first one when the engine is idle."""
        while True:
            try:
                command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if isinstance(command, _Stop):
                self.dead_reason = "the engine is shutting down"
                self._post(self._fail_all, self.dead_reason, False)
                return False
            if isinstance(command, _Add):
                try:
                    self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
                except Exception as exc:  # delivered to its own stream; others are untouched
                    self._post(self._deliver_error, command.request_id, exc)
            elif isinstance(command, _Abort):
                out = self.engine.abort_request(command.request_id)
                if out is not None:
                    self._post(self._deliver, [out])
                if command.done is not None:
                    self._post(_resolve, command.done, out is not None)
            self.stats = self.engine.stats()

    def _die(self, reason: str) -> None:
        self.dead_reason = reason
        self._post(self._fail_all, reason, True)

    def _post(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # ---- on the event loop ------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _deliver_error(self, request_id: str, exc: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(exc)

    def _fail_all(self, reason: str, died: bool) -> None:
        for stream in self._streams.values():
            stream.put_nowait(EngineDeadError(reason))
        if died and self.on_death is not None:
            self.on_death(reason)


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
        item.new_token_ids.extend(nxt.new_token_ids)
        if nxt.new_logprobs:
            item.new_logprobs = (item.new_logprobs or []) + nxt.new_logprobs
        if nxt.finished:
            item.finished, item.finish_reason = True, nxt.finish_reason
            item.num_prompt_tokens, item.num_output_tokens = nxt.num_prompt_tokens, nxt.num_output_tokens
            item.num_cached_tokens, item.queue_time = nxt.num_cached_tokens, nxt.queue_time
    return item


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


__all__ = ["AsyncEngine", "FinishReason"]
