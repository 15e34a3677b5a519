"""``python -m tokenizer_service --model DIR --engine HOST:PORT``: serve TokenizerService until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields

from service_common.logging import configure_logging
from service_common.metrics import start_metrics_server
from service_common.options import (
    add_engine_channel_options,
    add_security_options,
    engine_channel_security,
    parse_or_exit,
    server_security,
)
from service_common.server import ServerConfig, serve_until_signal
from tokenizer_service.chat_template import ChatTokenizer
from tokenizer_service.config import RequestLimits, TokenizerServiceConfig
from tokenizer_service.limits import option_name
from tokenizer_service.server import start_tokenizer_server

log = logging.getLogger("tokenizer_service")


def parse_args(argv: Sequence[str] | None = None) -> TokenizerServiceConfig:
    defaults = TokenizerServiceConfig.__dataclass_fields__
    server_defaults = ServerConfig()
    p = argparse.ArgumentParser(
        prog="python -m tokenizer_service",
        description="Serve qwen3serve.tokenizer.v1.TokenizerService (chat templates, tokenization, text "
        "streaming) in front of an EngineService.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory holding tokenizer.json and tokenizer_config.json (chat template)",
    )
    p.add_argument("--engine", required=True, help="the engine service's address, HOST:PORT")
    p.add_argument(
        "--host",
        default=defaults["host"].default,
        help="address to listen on (default: %(default)s; 0.0.0.0 for all interfaces)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=defaults["port"].default,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=defaults["metrics_port"].default,
        help="port of the Prometheus /metrics endpoint, on --host; 0 disables it (default: %(default)s)",
    )
    p.add_argument(
        "--engine-probe-interval",
        type=float,
        default=defaults["engine_probe_interval_s"].default,
        help="seconds between checks of the engine's health; this service is NOT_SERVING while "
        "the engine is not SERVING (default: %(default)s)",
    )
    p.add_argument(
        "--engine-probe-timeout",
        type=float,
        default=defaults["engine_probe_timeout_s"].default,
        help="seconds one engine health check may take (default: %(default)s)",
    )
    p.add_argument(
        "--grace-period",
        "--grace",
        dest="grace",
        type=float,
        default=defaults["grace_s"].default,
        help="on SIGTERM/SIGINT, seconds running streams get to finish; then they end ABORTED (default: %(default)s)",
    )
    p.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=server_defaults.max_concurrent_streams,
        help="Chat and Complete streams at once; more are answered RESOURCE_EXHAUSTED (health and "
        "unary RPCs are never limited) (default: %(default)s)",
    )
    p.add_argument(
        "--max-message-mb",
        type=int,
        default=server_defaults.max_message_bytes // 2**20,
        help="largest request or response message, MiB (default: %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default=defaults["log_level"].default,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="least severe log records written (default: %(default)s)",
    )
    p.add_argument(
        "--log-format",
        default=defaults["log_format"].default,
        choices=["kv", "json"],
        help="key=value lines or JSON lines (default: %(default)s)",
    )
    # ---- request limits: one option per RequestLimits field --------------------------------------
    limits = p.add_argument_group(
        "request limits",
        "checked before any other work; a request beyond one is "
        "answered INVALID_ARGUMENT naming the field and the limit (sizes: UTF-8 bytes)",
    )
    for f in fields(RequestLimits):
        limits.add_argument(
            option_name(f.name),
            type=int,
            default=f.default,
            metavar="N",
            help=f"{f.metadata['help']} (default: %(default)s)",
        )
    add_security_options(p)
    add_engine_channel_options(p)
    args = p.parse_args(argv)
    security = parse_or_exit(p, server_security, args)
    engine_security = parse_or_exit(p, engine_channel_security, args)
    try:
        return TokenizerServiceConfig(
            model=args.model,
            engine=args.engine,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            engine_probe_interval_s=args.engine_probe_interval,
            engine_probe_timeout_s=args.engine_probe_timeout,
            grace_s=args.grace,
            log_level=args.log_level,
            log_format=args.log_format,
            engine_security=engine_security,
            server=ServerConfig(
                max_concurrent_streams=args.max_concurrent_streams,
                max_message_bytes=args.max_message_mb * 2**20,
                security=security,
            ),
            limits=RequestLimits(**{f.name: getattr(args, f.name) for f in fields(RequestLimits)}),
        )
    except ValueError as exc:
        p.error(str(exc))  # exits with status 2 and the usage line


async def serve(config: TokenizerServiceConfig) -> None:
    tokenizer = await asyncio.to_thread(ChatTokenizer.from_pretrained, config.model)
    metrics_port = start_metrics_server(config.metrics_port, config.host)
    if metrics_port is not None:
        log.info("metrics exporter listening", extra={"address": f"{config.host}:{metrics_port}"})
    running = await start_tokenizer_server(
        tokenizer,
        config.engine,
        host=config.host,
        port=config.port,
        server_config=config.server,
        probe_interval_s=config.engine_probe_interval_s,
        probe_timeout_s=config.engine_probe_timeout_s,
        limits=config.limits,
        engine_security=config.engine_security,
    )
    try:
        await serve_until_signal(running.server, running.health, config.grace_s, on_grace_end=running.abort_all)
    finally:
        await running.stop(0)  # after the graceful stop: probe, channel (the server is already stopped)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    configure_logging(config.log_level, config.log_format)
    try:
        asyncio.run(serve(config))
    except OSError as exc:  # e.g. "cannot listen on 127.0.0.1:50052: address already in use"
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed (loading the tokenizer)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
