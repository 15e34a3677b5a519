"""A seeded fuzzer of both services over real sockets: random and byte-mutated requests, random cancels and
deadlines, every answer's status checked against what the proto and docs/RELIABILITY.md document.

    tally = await fuzz(engine_target, tokenizer_target, n=1000, seed=0)
    print(tally.summary())
    assert not tally.findings

Request ``i`` of seed ``s`` is drawn by :func:`draw` from its own ``random.Random(f"{s}/{i}")``, so the same
(seed, index) gives the same method, bytes and client action at any concurrency: a finding names both, and
``draw(seed, index)`` rebuilds it. Every call goes through a raw channel (bytes in, bytes out), so valid
and mutated bodies take the same path; a body that protobuf cannot parse must be answered INVALID_ARGUMENT.

A finding is an answer outside the method's documented statuses (INTERNAL and UNKNOWN never are), a call
that neither answered nor failed within ``hang_s`` (a hang), or an OK stream of the wrong shape (no final
message with a finish reason, a finish reason before the end, a token id past the vocabulary).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio
from fuzz_inputs import Inputs, Sizes, parses
from google.protobuf.message import Message

from qwen3serve.engine.v1 import engine_pb2
from qwen3serve.tokenizer.v1 import tokenizer_pb2

S = grpc.StatusCode
# Statuses each service's requests may get, besides those a client causes itself (CANCELLED after its
# cancel, DEADLINE_EXCEEDED after its deadline) and RESOURCE_EXHAUSTED for a body past the message limit.
_GENERATION = frozenset({S.OK, S.INVALID_ARGUMENT, S.ALREADY_EXISTS, S.RESOURCE_EXHAUSTED, S.UNAVAILABLE})
_UNARY = frozenset({S.OK, S.INVALID_ARGUMENT})
# Generations longer than this many tokens are always cancelled or given a deadline (keeps a run short).
_MAX_READ_TOKENS = 16


@dataclass(frozen=True)
class Method:
    """One RPC: where it is, how it streams, what it takes and returns, what it may answer."""

    service: str  # "engine" or "tokenizer"
    path: str
    streaming: bool
    request_type: type[Message]
    response_type: type[Message]
    documented: frozenset[grpc.StatusCode]
    make: Callable[[Inputs], Message]
    weight: float

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]


def _method(service: str, name: str, streaming: bool, module, request: str, documented, make, weight) -> Method:
    package = {"engine": "qwen3serve.engine.v1.EngineService", "tokenizer": "qwen3serve.tokenizer.v1.TokenizerService"}[
        service
    ]
    return Method(
        service,
        f"/{package}/{name}",
        streaming,
        getattr(module, f"{request}Request"),
        getattr(module, f"{request}Response"),
        documented,
        make,
        weight,
    )


METHODS: tuple[Method, ...] = (
    _method("engine", "Generate", True, engine_pb2, "Generate", _GENERATION, Inputs.generate, 0.30),
    _method("engine", "Abort", False, engine_pb2, "Abort", _UNARY, Inputs.abort, 0.05),
    _method(
        "engine",
        "GetModelInfo",
        False,
        engine_pb2,
        "GetModelInfo",
        _UNARY,
        lambda i: engine_pb2.GetModelInfoRequest(),
        0.02,
    ),
    _method("engine", "GetLoad", False, engine_pb2, "GetLoad", _UNARY, lambda i: engine_pb2.GetLoadRequest(), 0.03),
    _method("tokenizer", "Tokenize", False, tokenizer_pb2, "Tokenize", _UNARY, Inputs.tokenize, 0.12),
    _method("tokenizer", "Detokenize", False, tokenizer_pb2, "Detokenize", _UNARY, Inputs.detokenize, 0.10),
    _method(
        "tokenizer",
        "ApplyChatTemplate",
        False,
        tokenizer_pb2,
        "ApplyChatTemplate",
        _UNARY,
        Inputs.apply_chat_template,
        0.13,
    ),
    _method("tokenizer", "Chat", True, tokenizer_pb2, "Chat", _GENERATION, Inputs.chat, 0.15),
    _method("tokenizer", "Complete", True, tokenizer_pb2, "Complete", _GENERATION, Inputs.complete, 0.10),
)


@dataclass(frozen=True)
class Draw:
    """One fuzz request: what to call, with which bytes, and what the client does meanwhile."""

    index: int
    method: Method
    mode: str  # "valid", "mutated" (still parses) or "unparseable"
    body: bytes
    action: str  # "read" (to the end), "cancel" (after cancel_after_s) or "deadline"
    cancel_after_s: float = 0.0
    timeout_s: float | None = None


def _unbounded(request: Message) -> bool:
    """Whether a parsed generation request may run past _MAX_READ_TOKENS tokens."""
    if not hasattr(request, "sampling_params"):
        return False
    sampling = request.sampling_params
    return not sampling.HasField("max_tokens") or sampling.max_tokens > _MAX_READ_TOKENS


def draw(seed: int, index: int, sizes: Sizes = Sizes()) -> Draw:
    """Request ``index`` of run ``seed``: a pure function of both."""
    rng = random.Random(f"{seed}/{index}")
    inputs = Inputs(rng, sizes)
    method = rng.choices(METHODS, weights=[m.weight for m in METHODS])[0]
    kind = rng.random()
    body = method.make(inputs).SerializeToString()
    if kind >= 0.9:
        body = inputs.random_bytes()
    elif kind >= 0.6:
        body = inputs.mutate(body)
    parsed = method.request_type()
    ok = parses(body, method.request_type)
    mode = "valid" if kind < 0.6 else ("mutated" if ok else "unparseable")
    if ok:
        parsed.ParseFromString(body)
    action = rng.choices(("read", "cancel", "deadline"), weights=(0.7, 0.15, 0.15))[0]
    if action == "read" and method.streaming and ok and _unbounded(parsed):
        action = rng.choice(("cancel", "deadline"))
    return Draw(
        index,
        method,
        mode,
        body,
        action,
        cancel_after_s=rng.uniform(0.0, 0.3),
        timeout_s=rng.choice((0.001, 0.01, 0.05, 0.2, 1.0)) if action == "deadline" else None,
    )


@dataclass(frozen=True)
class Finding:
    """An answer the services must never give, with what it takes to reproduce it."""

    seed: int
    index: int
    method: str
    mode: str
    action: str
    status: str
    details: str
    body_len: int
    body_head: str  # the first 64 bytes, hex

    def __str__(self) -> str:
        return (
            f"seed={self.seed} index={self.index} {self.method} ({self.mode}, {self.action}): {self.status} "
            f"{self.details[:300]!r}; body {self.body_len} bytes, starts {self.body_head}"
        )


@dataclass
class Tally:
    """Counts of (method, mode, status), the findings, and how long the run took."""

    seed: int
    counts: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def status_count(self, *names: str) -> int:
        return sum(n for (_, _, status), n in self.counts.items() if status in names)

    def summary(self) -> str:
        """A table: one row per method, one column per status seen; then totals per mode."""
        statuses = sorted({status for _, _, status in self.counts})
        rows = [["method", "requests", *statuses]]
        for method in METHODS:
            per = Counter()
            for (m, _, status), n in self.counts.items():
                if m == method.name:
                    per[status] += n
            rows.append([method.name, str(sum(per.values())), *(str(per[s]) for s in statuses)])
        modes = Counter()
        for (_, mode, _), n in self.counts.items():
            modes[mode] += n
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
        lines.append(
            f"{self.total} requests (seed {self.seed}) in {self.elapsed_s:.1f} s: "
            + ", ".join(f"{n} {mode}" for mode, n in sorted(modes.items()))
            + f"; {len(self.findings)} findings"
        )
        return "\n".join(lines)


def _allowed(d: Draw, max_message_bytes: dict[str, int]) -> frozenset[grpc.StatusCode]:
    allowed = set(d.method.documented if d.mode != "unparseable" else {S.INVALID_ARGUMENT})
    if d.action == "cancel":
        allowed.add(S.CANCELLED)
    if d.action == "deadline":
        allowed.add(S.DEADLINE_EXCEEDED)
    if len(d.body) > max_message_bytes[d.method.service]:
        allowed.add(S.RESOURCE_EXHAUSTED)
    return frozenset(allowed)


def _shape_error(d: Draw, responses: list[bytes], vocab_size: int) -> str | None:
    """What is wrong with an OK answer, if anything."""
    try:
        messages = [d.method.response_type.FromString(r) for r in responses]
    except Exception as exc:
        return f"response does not parse: {exc}"
    if not d.method.streaming:
        return None
    if not messages:
        return "stream ended OK without a message"
    reasons = [m.finish_reason for m in messages]
    if reasons[-1] == engine_pb2.FINISH_REASON_UNSPECIFIED or any(reasons[:-1]):
        return f"finish reasons {reasons}: set on the last message only"
    bad = [t for m in messages for t in getattr(m, "token_ids", ()) if t >= vocab_size]
    return f"token ids past the vocabulary: {bad[:5]}" if bad else None


async def _send(channel: grpc.aio.Channel, d: Draw, hang_s: float) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Make the call and act as the draw says; (status, details, response bodies)."""
    identity = lambda b: b  # noqa: E731 (raw bytes both ways)
    factory = channel.unary_stream if d.method.streaming else channel.unary_unary
    call = factory(d.method.path, request_serializer=identity, response_deserializer=identity)(
        d.body, timeout=d.timeout_s if d.timeout_s is not None else hang_s
    )
    canceller = asyncio.get_running_loop().call_later(d.cancel_after_s, call.cancel) if d.action == "cancel" else None
    try:
        responses = [r async for r in call] if d.method.streaming else [await call]
        return S.OK, "", responses
    except grpc.aio.AioRpcError as exc:
        if exc.code() == S.DEADLINE_EXCEEDED and d.timeout_s is None:
            return exc.code(), f"HANG: no answer within {hang_s} s", []
        return exc.code(), exc.details() or "", []
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if d.action == "cancel" and call.cancelled() and not (task and task.cancelling()):
            return S.CANCELLED, "cancelled by the fuzzer", []
        raise
    finally:
        if canceller is not None:
            canceller.cancel()


def _channel(target: str) -> grpc.aio.Channel:
    # The client's own limits are wide, so that bodies past a server's limit reach the server.
    return grpc.aio.insecure_channel(
        target, options=[("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
    )


async def fuzz(
    engine_target: str,
    tokenizer_target: str,
    n: int,
    seed: int,
    concurrency: int = 8,
    sizes: Sizes = Sizes(),
    hang_s: float = 60.0,
    tokenizer_max_message_bytes: int = 64 << 20,
) -> Tally:
    """Send requests 0..n-1 of ``seed`` to both services, ``concurrency`` at a time; their tally."""
    tally = Tally(seed)
    limits = {"engine": sizes.engine_max_message_bytes, "tokenizer": tokenizer_max_message_bytes}
    indices = iter(range(n))
    start = time.perf_counter()
    async with _channel(engine_target) as engine, _channel(tokenizer_target) as tokenizer:
        channels = {"engine": engine, "tokenizer": tokenizer}

        async def worker() -> None:
            for index in indices:
                d = draw(seed, index, sizes)
                status, details, responses = await _send(channels[d.method.service], d, hang_s)
                problem = None
                if details.startswith("HANG") or status not in _allowed(d, limits):
                    problem = details
                elif status == S.OK:
                    problem = _shape_error(d, responses, sizes.vocab_size)
                label = status.name if problem is None or status != S.OK else "OK_BAD_SHAPE"
                tally.counts[(d.method.name, d.mode, label)] += 1
                if problem is not None:
                    tally.findings.append(
                        Finding(
                            seed, index, d.method.name, d.mode, d.action, label, problem, len(d.body), d.body[:64].hex()
                        )
                    )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    tally.elapsed_s = time.perf_counter() - start
    return tally
