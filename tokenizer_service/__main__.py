"""``python -m tokenizer_service --model DIR --engine HOST:PORT``: serve TokenizerService until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from service_common.logging import configure_logging
from service_common.metrics import start_metrics_server
from service_common.options import (
    TOKENIZER_PORT,
    add_engine_channel_options,
    add_limit_options,
    add_log_options,
    add_model_option,
    add_security_options,
    add_server_options,
    engine_channel_security,
    limits_from_args,
    parse_or_exit,
    server_config,
    server_security,
)
from service_common.server import ServerConfig, serve_until_signal
from tokenizer_service.chat_template import ChatTokenizer
from tokenizer_service.config import RequestLimits, TokenizerServiceConfig
from tokenizer_service.server import start_tokenizer_server

log = logging.getLogger("tokenizer_service")


def parse_args(argv: Sequence[str] | None = None) -> TokenizerServiceConfig:
    defaults = TokenizerServiceConfig.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="python -m tokenizer_service",
        description="Serve qwen3serve.tokenizer.v1.TokenizerService (chat templates, tokenization, text "
        "streaming) in front of an EngineService.",
    )
    add_model_option(p, "tokenizer.json and tokenizer_config.json (the chat template)")
    p.add_argument("--engine", required=True, help="the engine service's address, HOST:PORT")
    add_server_options(
        p, port=TOKENIZER_PORT, streams="Chat and Complete", max_message_bytes=ServerConfig.max_message_bytes
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
    add_log_options(p)
    add_limit_options(p, RequestLimits)
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
            grace_s=args.grace_period,
            log_level=args.log_level,
            log_format=args.log_format,
            engine_security=engine_security,
            server=server_config(args, security),
            limits=limits_from_args(RequestLimits, args),
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
