"""Tensor-parallel worker processes (ranks 1..N-1), driven by rank 0 through typed commands.

Each worker owns a ``ModelRunner`` on its own GPU (or CPU rank, with gloo) and obeys commands sent
over its own pipe: there are no method names in shared memory and no fixed ports (the process group
rendezvous uses a free loopback port chosen at start). A monitor thread watches the workers'
process sentinels, so a dead worker is reported at once instead of being waited on forever.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import socket
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from multiprocessing.connection import Connection, wait
from typing import TypeVar

from engine_service.config import EngineConfig
from engine_service.core.step_input import StepInput

log = logging.getLogger(__name__)


# ---- commands (rank 0 -> worker) ------------------------------------------------------------
class Order(Enum):
    """A command that carries nothing."""

    REPORT_CAPACITY = "report-capacity"  # profile memory, reply with a Capacity
    CAPTURE_CUDA_GRAPHS = "capture-cuda-graphs"  # reply Reached(DONE)
    SHUTDOWN = "shutdown"  # leave the command loop, no reply


@dataclass(frozen=True)
class AllocateKVCache:
    """Allocate this many KV blocks (the minimum over ranks), reply Reached(DONE)."""

    num_blocks: int


@dataclass(frozen=True)
class Execute:
    step: StepInput  # no reply: the collectives keep the ranks in step


Command = Order | AllocateKVCache | Execute


# ---- replies (worker -> rank 0) -------------------------------------------------------------
class Stage(Enum):
    STARTED = "started"  # imported everything, about to join the process group
    READY = "ready"  # the model runner is built (weights loaded)
    DONE = "done"  # the last command that asks for a reply is done


@dataclass(frozen=True)
class Reached:
    """A worker got to a stage (the reply to start-up and to the commands that want one)."""

    rank: int
    stage: Stage


@dataclass(frozen=True)
class Capacity:
    """How many KV blocks fit on this rank."""

    rank: int
    num_blocks: int


@dataclass(frozen=True)
class WorkerFailed:
    rank: int
    error: str  # the worker's traceback


Reply = Reached | Capacity | WorkerFailed
R = TypeVar("R", Reached, Capacity)


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed or died."""


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(config: EngineConfig, rank: int, init_method: str, conn: Connection) -> None:
    from engine_service.core.model_runner import ModelRunner  # imported in the child: it initialises torch

    try:
        conn.send(Reached(rank, Stage.STARTED))
        runner = ModelRunner(config, rank, init_method)
        conn.send(Reached(rank, Stage.READY))
        while True:
            command = conn.recv()
            if isinstance(command, Execute):
                runner.execute(command.step)  # no reply: the collectives keep ranks in step
                runner.share_sampled(command.step, None)
            elif command is Order.REPORT_CAPACITY:
                conn.send(Capacity(rank, runner.kv_block_capacity()))
            elif isinstance(command, AllocateKVCache):
                runner.allocate_kv_cache(command.num_blocks)
                conn.send(Reached(rank, Stage.DONE))
            elif command is Order.CAPTURE_CUDA_GRAPHS:
                runner.capture_cuda_graphs()
                conn.send(Reached(rank, Stage.DONE))
            elif command is Order.SHUTDOWN:
                break
            else:
                raise TypeError(f"unknown command {command!r}")
    except (EOFError, KeyboardInterrupt):
        pass  # rank 0 went away
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(WorkerFailed(rank, traceback.format_exc()))
        raise


class WorkerGroup:
    """Ranks 1..N-1. ``init_method`` is for rank 0's own ``ModelRunner``."""

    def __init__(self, config: EngineConfig, on_death: Callable[[str], None] | None = None) -> None:
        self.world_size = config.tensor_parallel_size
        self.init_method = f"tcp://127.0.0.1:{free_loopback_port()}"
        ctx = mp.get_context("spawn")  # CUDA cannot be re-initialised in a forked child
        self._conns: list[Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        for rank in range(1, self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(config, rank, self.init_method, child), name=f"tp-worker-{rank}", daemon=True
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._closing = False
        self.death_reason: str | None = None
        self._on_death = on_death
        self._monitor = threading.Thread(target=self._watch, name="tp-worker-monitor", daemon=True)
        self._monitor.start()
        # Rank 0 joins the process group only once every worker got that far: a worker that fails on
        # import would otherwise leave rank 0 blocked in the rendezvous until its timeout.
        try:
            self._wait_for(Stage.STARTED)
        except WorkerError:
            self.shutdown()
            raise

    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self._procs}
        ready = wait(list(sentinels))
        if self._closing:
            return
        proc = sentinels[ready[0]]
        self.death_reason = f"tensor-parallel worker {proc.name} exited with code {proc.exitcode}"
        log.error(self.death_reason)
        if self._on_death is not None:
            self._on_death(self.death_reason)

    def _send(self, command: Command) -> None:
        if self.death_reason:
            raise WorkerError(self.death_reason)
        for conn in self._conns:
            try:
                conn.send(command)
            except OSError as exc:
                raise WorkerError(f"cannot reach a tensor-parallel worker: {exc}") from exc

    def _collect(self, expected: type[R]) -> list[R]:
        """One reply of type ``expected`` from every worker, in rank order."""
        replies: list[R] = []
        for conn, proc in zip(self._conns, self._procs):
            while not conn.poll(0.5):
                if not proc.is_alive():
                    raise WorkerError(f"tensor-parallel worker {proc.name} died (exit code {proc.exitcode})")
            reply = conn.recv()
            if isinstance(reply, WorkerFailed):
                raise WorkerError(f"tensor-parallel worker rank {reply.rank} failed:\n{reply.error}")
            if not isinstance(reply, expected):
                raise WorkerError(f"unexpected reply {reply!r} from {proc.name}")
            replies.append(reply)
        return replies

    def _wait_for(self, stage: Stage) -> None:
        for reply in self._collect(Reached):
            if reply.stage is not stage:
                raise WorkerError(f"tensor-parallel worker rank {reply.rank} reached {reply.stage}, not {stage}")

    def wait_ready(self) -> None:
        self._wait_for(Stage.READY)

    def request_capacity(self) -> None:
        self._send(Order.REPORT_CAPACITY)

    def collect_capacity(self) -> list[int]:
        return [c.num_blocks for c in self._collect(Capacity)]

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._send(AllocateKVCache(num_blocks))

    def capture_cuda_graphs(self) -> None:
        self._send(Order.CAPTURE_CUDA_GRAPHS)

    def wait_done(self) -> None:
        self._wait_for(Stage.DONE)

    def execute(self, step: StepInput) -> None:
        self._send(Execute(step))

    def shutdown(self) -> None:
        self._closing = True
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(Order.SHUTDOWN)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
