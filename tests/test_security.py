"""TLS, mutual TLS and API-key authentication of both servers, over real loopback sockets, with
certificates made in the test (tests/pki.py); the CLI options that configure them.

The main fixture is the real engine (demo model, CPU) with TLS, mutual TLS and a key, and the real
tokenizer service in front of it with TLS and another key, reaching the engine with a client
certificate and the engine's key, as a production deployment would.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pki import Pki, write_pki
from serving import REPO, Services, free_port, health_status, start_services

from clients import AsyncEngineClient, AsyncTokenizerClient, EngineClient, TokenizerClient
from engine_service.__main__ import parse_args as engine_args
from engine_service.server import SERVICE_NAME as ENGINE_SERVICE
from qwen3serve.engine.v1 import engine_pb2
from service_common.options import engine_channel_security, server_security
from service_common.security import ChannelSecurity, ChannelTls, ServerSecurity, ServerTls, aio_channel, warn_if_exposed
from service_common.server import ServerConfig, bind, build_server
from tokenizer_service.__main__ import parse_args as tokenizer_args
from tokenizer_service.chat_template import ChatTokenizer
from tokenizer_service.server import SERVICE_NAME as TOKENIZER_SERVICE
from tokenizer_service.server import start_tokenizer_server

module_loop = pytest.mark.asyncio(loop_scope="module")

ENGINE_KEY = "engine-key-0123456789abcdef"
TOKENIZER_KEY = "tokenizer-key-0123456789abcdef"
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return write_pki(tmp_path_factory.mktemp("pki"))


def server_tls(pki: Pki, mutual: bool = False) -> ServerTls:
    return ServerTls(pki.server_cert.read_bytes(), pki.server_key.read_bytes(), pki.ca.read_bytes() if mutual else None)


def client_tls(pki: Pki, with_cert: bool = True) -> ChannelTls:
    if not with_cert:
        return ChannelTls(pki.ca.read_bytes())
    return ChannelTls(pki.ca.read_bytes(), pki.client_cert.read_bytes(), pki.client_key.read_bytes())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured(demo_checkpoint: Path, pki: Pki) -> AsyncIterator[Services]:
    running = await start_services(
        demo_checkpoint,
        max_model_len=256,
        num_kv_blocks=64,
        engine_server_config=ServerConfig(security=ServerSecurity(server_tls(pki, mutual=True), ENGINE_KEY)),
        tokenizer_server_config=ServerConfig(security=ServerSecurity(server_tls(pki), TOKENIZER_KEY)),
        engine_security=ChannelSecurity(client_tls(pki), ENGINE_KEY),
    )
    yield running
    await running.stop()


def engine_client(services: Services, pki: Pki, api_key: str | None) -> AsyncEngineClient:
    return AsyncEngineClient(
        services.engine_target,
        root_certificates=pki.ca.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        api_key=api_key,
    )


def tokenizer_client(services: Services, pki: Pki, api_key: str | None) -> AsyncTokenizerClient:
    return AsyncTokenizerClient(services.tokenizer_target, root_certificates=pki.ca.read_bytes(), api_key=api_key)


async def _drain(stream: AsyncIterator) -> list:
    return [r async for r in stream]


# ---- the secured pair ------------------------------------------------------------------------------
@module_loop
async def test_chat_end_to_end_through_a_secured_engine(secured: Services, pki: Pki) -> None:
    async with tokenizer_client(secured, pki, TOKENIZER_KEY) as client:
        responses = await _drain(client.chat([{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0))
    assert responses[-1].finish_reason in (engine_pb2.FINISH_REASON_LENGTH, engine_pb2.FINISH_REASON_STOP)
    assert responses[-1].usage.completion_tokens >= 1

    def blocking_clients() -> None:  # the blocking clients take the same credentials (off the servers' loop)
        with TokenizerClient(
            secured.tokenizer_target, root_certificates=pki.ca.read_bytes(), api_key=TOKENIZER_KEY
        ) as sync_client:
            assert sync_client.tokenize("Hello", timeout=10) == [9707]
            with pytest.raises(grpc.RpcError) as info:
                TokenizerClient(secured.tokenizer_target, root_certificates=pki.ca.read_bytes()).tokenize("Hi")
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with EngineClient(
            secured.engine_target,
            root_certificates=pki.ca.read_bytes(),
            api_key=ENGINE_KEY,
            certificate_chain=pki.client_cert.read_bytes(),
            private_key=pki.client_key.read_bytes(),
        ) as sync_engine:
            stream = sync_engine.generate([9707], max_tokens=3, temperature=0, timeout=30)
            assert len([t for r in stream for t in r.token_ids]) == 3

    await asyncio.to_thread(blocking_clients)


ENGINE_CALLS: dict[str, Callable[[AsyncEngineClient], Awaitable[object]]] = {
    "Generate": lambda c: _drain(c.generate([9707, 11], max_tokens=2)),
    "GetModelInfo": lambda c: c.model_info(timeout=10),
    "GetLoad": lambda c: c.load(timeout=10),
    "Abort": lambda c: c.abort("nobody", timeout=10),
}
TOKENIZER_CALLS: dict[str, Callable[[AsyncTokenizerClient], Awaitable[object]]] = {
    "Chat": lambda c: _drain(c.chat([{"role": "user", "content": "Hi"}], max_tokens=2)),
    "Complete": lambda c: _drain(c.complete("Once", max_tokens=2)),
    "Tokenize": lambda c: c.tokenize("Hello", timeout=10),
    "Detokenize": lambda c: c.detokenize([9707], timeout=10),
    "ApplyChatTemplate": lambda c: c.apply_chat_template([{"role": "user", "content": "Hi"}], timeout=10),
}
BAD_KEYS = {"missing": None, "wrong": "not-the-key-0123456789", "prefix": ENGINE_KEY[:-1]}


@module_loop
@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize("method", ENGINE_CALLS)
async def test_engine_rpcs_need_the_key(secured: Services, pki: Pki, method: str, key: str) -> None:
    async with engine_client(secured, pki, BAD_KEYS[key]) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ENGINE_CALLS[method](client)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    async with engine_client(secured, pki, ENGINE_KEY) as client:
        try:
            await ENGINE_CALLS[method](client)  # the same call with the key gets through
        except grpc.aio.AioRpcError as exc:  # Abort of an unknown id: the engine's own answer
            assert method == "Abort" and exc.code() == grpc.StatusCode.NOT_FOUND, exc


@module_loop
@pytest.mark.parametrize("key", ["missing", "wrong", "engine's"])
@pytest.mark.parametrize("method", TOKENIZER_CALLS)
async def test_tokenizer_rpcs_need_the_key(secured: Services, pki: Pki, method: str, key: str) -> None:
    api_key = {"missing": None, "wrong": "not-the-key-0123456789", "engine's": ENGINE_KEY}[key]
    async with tokenizer_client(secured, pki, api_key) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await TOKENIZER_CALLS[method](client)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    async with tokenizer_client(secured, pki, TOKENIZER_KEY) as client:
        await TOKENIZER_CALLS[method](client)


@module_loop
async def test_the_bearer_scheme_is_case_insensitive_and_one_header_only(secured: Services, pki: Pki) -> None:
    async with aio_channel(secured.tokenizer_target, security=ChannelSecurity(client_tls(pki, False))) as channel:
        tokenize = channel.unary_unary(
            "/qwen3serve.tokenizer.v1.TokenizerService/Tokenize",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        await tokenize(b"", metadata=[("authorization", f"bearer {TOKENIZER_KEY}")], timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:  # two keys, one right: refused, not "any of them"
            await tokenize(
                b"",
                timeout=10,
                metadata=[
                    ("authorization", "Bearer wrong-key-0123456789"),
                    ("authorization", f"Bearer {TOKENIZER_KEY}"),
                ],
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await tokenize(b"", metadata=[("authorization", f"Basic {TOKENIZER_KEY}")], timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@module_loop
async def test_a_wrong_engine_key_is_a_server_error_not_the_callers(
    secured: Services, pki: Pki, tokenizer: ChatTokenizer
) -> None:
    front = await start_tokenizer_server(
        tokenizer, secured.engine_target, engine_security=ChannelSecurity(client_tls(pki), "not-the-key-0123456789")
    )
    try:
        async with AsyncTokenizerClient(f"127.0.0.1:{front.port}") as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _drain(client.chat([{"role": "user", "content": "Hi"}], max_tokens=2, timeout=10))
        assert info.value.code() == grpc.StatusCode.INTERNAL
    finally:
        await front.stop(0)


@module_loop
async def test_health_answers_without_a_key(secured: Services, pki: Pki) -> None:
    assert (
        await health_status(
            secured.tokenizer_target, TOKENIZER_SERVICE, ChannelSecurity(client_tls(pki, with_cert=False))
        )
        == SERVING
    )
    assert await health_status(secured.engine_target, ENGINE_SERVICE, ChannelSecurity(client_tls(pki))) == SERVING


@module_loop
async def test_reflection_needs_the_key(secured: Services, pki: Pki) -> None:
    async def list_services(api_key: str | None) -> list[str]:
        async with aio_channel(secured.tokenizer_target, security=ChannelSecurity(client_tls(pki), api_key)) as ch:
            call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            return [s.name for r in [r async for r in call] for s in r.list_services_response.service]

    assert TOKENIZER_SERVICE in await list_services(TOKENIZER_KEY)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await list_services(None)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@module_loop
@pytest.mark.parametrize(
    "client", ["plaintext", "plaintext with key", "trusts another CA", "no client cert", "cert of another CA"]
)
async def test_the_engine_refuses_clients_without_the_right_transport(secured: Services, pki: Pki, client: str) -> None:
    tls = {
        "plaintext": None,
        "plaintext with key": None,
        "trusts another CA": ChannelTls(pki.other_ca.read_bytes()),
        "no client cert": client_tls(pki, with_cert=False),
        "cert of another CA": ChannelTls(
            pki.ca.read_bytes(), pki.other_client_cert.read_bytes(), pki.other_client_key.read_bytes()
        ),
    }[client]
    async with AsyncEngineClient(
        channel=aio_channel(secured.engine_target, security=ChannelSecurity(tls, ENGINE_KEY))
    ) as engine:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await engine.model_info(timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no RPC reaches a handler
        await engine.channel.close()
    assert secured.tokenizer.probe.engine_serving is True  # the failed handshakes harmed nothing


# ---- TLS alone, on a tokenizer server with no engine behind it (Tokenize needs none) ---------------
@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
async def test_tls_serves_and_plaintext_fails(tokenizer: ChatTokenizer, pki: Pki, mutual: bool) -> None:
    running = await start_tokenizer_server(
        tokenizer,
        f"127.0.0.1:{free_port()}",
        server_config=ServerConfig(security=ServerSecurity(server_tls(pki, mutual))),
    )
    target = f"127.0.0.1:{running.port}"
    try:
        async with AsyncTokenizerClient(
            target,
            root_certificates=pki.ca.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
            private_key=pki.client_key.read_bytes(),
        ) as client:
            assert await client.tokenize("Hello", timeout=10) == [9707]  # no key configured: none needed
        refused = [AsyncTokenizerClient(target), AsyncTokenizerClient(target, tls=True)]  # system CAs
        if mutual:
            refused.append(AsyncTokenizerClient(target, root_certificates=pki.ca.read_bytes()))
        else:  # without mutual TLS a client certificate is not needed
            async with AsyncTokenizerClient(target, root_certificates=pki.ca.read_bytes()) as client:
                assert await client.tokenize("Hello", timeout=10) == [9707]
        for client in refused:
            async with client:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.tokenize("Hello", timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)


# ---- the warning --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "host,security,warns",
    [
        ("0.0.0.0", None, True),
        ("::", None, True),
        ("10.1.2.3", ServerSecurity(), True),
        ("0.0.0.0", ServerSecurity(api_key=ENGINE_KEY), False),
        ("127.0.0.1", None, False),
        ("localhost", None, False),
        ("[::1]", None, False),
    ],
)
def test_warns_once_when_exposed_without_tls_or_key(
    caplog: pytest.LogCaptureFixture, host: str, security: ServerSecurity | None, warns: bool
) -> None:
    with caplog.at_level(logging.WARNING, logger="service_common.security"):
        assert warn_if_exposed(host, security) is warns
    assert len(caplog.records) == int(warns)


async def test_bind_on_all_interfaces_warns_once(caplog: pytest.LogCaptureFixture, pki: Pki) -> None:
    for security, expected in ((None, 1), (ServerSecurity(server_tls(pki)), 0)):
        caplog.clear()
        server, _ = build_server([TOKENIZER_SERVICE], ServerConfig(security=security or ServerSecurity()))
        with caplog.at_level(logging.WARNING, logger="service_common.security"):
            bind(server, "0.0.0.0", 0, security)
        await server.stop(None)
        assert [r.levelname for r in caplog.records] == ["WARNING"] * expected


# ---- the CLI options --------------------------------------------------------------------------------
def _args(pki: Pki, **overrides: str | None) -> argparse.Namespace:
    values = dict(
        tls_cert=None,
        tls_key=None,
        tls_client_ca=None,
        api_key=None,
        api_key_file=None,
        engine_tls=False,
        engine_tls_ca=None,
        engine_tls_cert=None,
        engine_tls_key=None,
        engine_api_key=None,
        engine_api_key_file=None,
    )
    return argparse.Namespace(**{**values, **overrides})


def test_options_build_the_configs(pki: Pki, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(ENGINE_KEY + "\n")
    security = server_security(
        _args(
            pki,
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
            tls_client_ca=str(pki.ca),
            api_key_file=str(key_file),
        ),
        env={},
    )
    assert security.tls is not None and security.tls.client_ca == pki.ca.read_bytes()
    assert security.api_key == ENGINE_KEY and ENGINE_KEY not in repr(security)
    assert server_security(_args(pki), env={}) == ServerSecurity()
    assert server_security(_args(pki), env={"QWEN3SERVE_API_KEY": TOKENIZER_KEY}).api_key == TOKENIZER_KEY
    channel = engine_channel_security(_args(pki, engine_tls_ca=str(pki.ca)), env={"QWEN3SERVE_API_KEY": ENGINE_KEY})
    assert channel.tls == ChannelTls(pki.ca.read_bytes()) and channel.api_key == ENGINE_KEY
    channel = engine_channel_security(
        _args(pki, engine_tls=True), env={"QWEN3SERVE_API_KEY": TOKENIZER_KEY, "QWEN3SERVE_ENGINE_API_KEY": ENGINE_KEY}
    )
    assert channel.tls == ChannelTls() and channel.api_key == ENGINE_KEY
    assert engine_channel_security(_args(pki), env={}) == ChannelSecurity()


BAD_OPTIONS = [
    (["--tls-key", "{server_key}"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "{server_key}"], "--tls-cert: cannot read /nonexistent"),
    (["--tls-cert", "{server_key}", "--tls-key", "{server_key}"], "--tls-cert: {server_key} holds no PEM certificate"),
    (["--tls-cert", "{server_cert}", "--tls-key", "{ca}"], "--tls-key: {ca} holds no PEM private key"),
    (["--tls-client-ca", "{ca}"], "--tls-client-ca needs --tls-cert"),
    (["--api-key", "short"], "--api-key: must be at least 16 characters, got 5"),
    (["--api-key", "with space 0123456789"], "--api-key: must be printable ASCII without spaces"),
    (["--api-key", ENGINE_KEY, "--api-key-file", "{ca}"], "--api-key and --api-key-file: give one of them"),
    (["--api-key-file", "/nonexistent/key"], "--api-key-file: cannot read /nonexistent/key"),
]
ENGINE_CHANNEL_BAD_OPTIONS = [
    (["--engine-tls-cert", "{client_cert}"], "--engine-tls-cert and --engine-tls-key go together"),
    (["--engine-tls-ca", "/nonexistent/ca.pem"], "--engine-tls-ca: cannot read /nonexistent/ca.pem"),
    (["--engine-api-key", "short"], "--engine-api-key: must be at least 16 characters"),
]


def _fill(text: str, pki: Pki) -> str:
    return text.format(**{k: str(v) for k, v in vars(pki).items()})


@pytest.mark.parametrize("cli", ["engine", "tokenizer"])
@pytest.mark.parametrize(
    "argv,message",
    BAD_OPTIONS + ENGINE_CHANNEL_BAD_OPTIONS,
    ids=[m for _, m in BAD_OPTIONS + ENGINE_CHANNEL_BAD_OPTIONS],
)
def test_a_bad_option_is_one_error_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    pki: Pki,
    demo_checkpoint: Path,
    cli: str,
    argv: list[str],
    message: str,
) -> None:
    if cli == "engine" and argv[0].startswith("--engine"):
        pytest.skip("an option of the tokenizer service only")
    monkeypatch.delenv("QWEN3SERVE_API_KEY", raising=False)
    base = ["--model", str(demo_checkpoint)] + (["--engine", "127.0.0.1:1"] if cli == "tokenizer" else [])
    with pytest.raises(SystemExit) as info:
        (engine_args if cli == "engine" else tokenizer_args)(base + [_fill(a, pki) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert ": error: " in err.splitlines()[-1] and _fill(message, pki) in err.splitlines()[-1], err
    assert "Traceback" not in err


@pytest.mark.parametrize("cli", [engine_args, tokenizer_args], ids=["engine", "tokenizer"])
def test_every_security_option_shows_its_default(capsys: pytest.CaptureFixture[str], cli) -> None:
    with pytest.raises(SystemExit):
        cli(["--help"])
    text = capsys.readouterr().out
    section = text[text.index("security:") :]
    blocks = list(section.split("\n  --")[1:])
    assert len(blocks) >= (5 if cli is engine_args else 11)
    for block in blocks:
        assert "(default:" in " ".join(block.split()), block


async def test_the_tokenizer_cli_serves_tls_and_a_key_file(demo_checkpoint: Path, pki: Pki, tmp_path: Path) -> None:
    """The options wired through ``python -m tokenizer_service`` (a real process)."""
    key_file = tmp_path / "key"
    key_file.write_text(TOKENIZER_KEY + "\n")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenizer_service",
        "--model",
        str(demo_checkpoint),
        "--engine",
        f"127.0.0.1:{free_port()}",
        "--port",
        str(port),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--api-key-file",
        str(key_file),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # health needs no key; NOT_SERVING: no engine behind it
            try:
                status = await health_status(target, TOKENIZER_SERVICE, ChannelSecurity(client_tls(pki, False)))
                break
            except grpc.aio.AioRpcError:
                assert time.monotonic() < deadline and proc.returncode is None, "the CLI did not start"
                await asyncio.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        async with AsyncTokenizerClient(target, root_certificates=pki.ca.read_bytes(), api_key=TOKENIZER_KEY) as c:
            assert await c.tokenize("Hello", timeout=10) == [9707]
        async with AsyncTokenizerClient(target, root_certificates=pki.ca.read_bytes()) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.tokenize("Hello", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
