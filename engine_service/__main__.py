"""``python -m engine_service --model DIR [options]``: serve EngineService over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from engine_service.config import EngineConfig
from engine_service.limits import ENGINE_MAX_MESSAGE_BYTES, RequestLimits
from qwen3.attention.names import BACKEND_CHOICES
from qwen3.dtypes import DTYPE_NAMES
from service_common.options import (
    ENGINE_PORT,
    add_limit_options,
    add_log_options,
    add_model_option,
    add_security_options,
    add_server_options,
    limits_from_args,
    parse_or_exit,
    server_config,
    server_security,
)

log = logging.getLogger("engine_service")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m engine_service",
        description="Serve a Qwen3 checkpoint over gRPC (qwen3serve.engine.v1.EngineService): "
        "token ids in, streamed token ids out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def config_option(flag: str, **kwargs: Any) -> None:
        """``flag`` for EngineConfig's field of the same name (``--kv-block-size``: ``kv_block_size``), defaulting
        to that field's default, so the CLI's defaults cannot drift from the config's."""
        field = EngineConfig.__dataclass_fields__[flag.removeprefix("--").replace("-", "_")]
        p.add_argument(flag, default=field.default, **kwargs)

    add_model_option(p, "a Hugging Face checkpoint (config.json + *.safetensors)")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="name reported by GetModelInfo (default: %(default)s: the directory name)",
    )
    add_server_options(
        p,
        port=ENGINE_PORT,
        streams="Generate",
        max_message_bytes=ENGINE_MAX_MESSAGE_BYTES,
        message_note=" (a 128k-token prompt is < 1 MiB)",
    )
    config_option("--tensor-parallel-size", type=int, help="GPUs to split the model across")
    config_option("--dtype", choices=["auto", *DTYPE_NAMES], help="weight/activation dtype (auto: the checkpoint's)")
    config_option("--device", choices=["auto", "cuda", "cpu"], help="where the model runs (auto: cuda when available)")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="max prompt+output tokens (default: %(default)s: the model's)"
    )
    config_option("--max-num-seqs", type=int, help="max sequences per step")
    config_option("--max-num-batched-tokens", type=int, help="token budget of one step (prefill chunks + decodes)")
    config_option("--kv-block-size", type=int, help="tokens per KV block")
    p.add_argument(
        "--num-kv-blocks", type=int, default=None, help="fixed KV pool size (default: %(default)s: sized from memory)"
    )
    config_option("--gpu-memory-utilization", type=float, help="fraction of GPU memory to use, KV cache included")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overlap each step's host work with the previous step's GPU work (default: %(default)s: on for CUDA)",
    )
    config_option(
        "--attention-backend",
        choices=BACKEND_CHOICES,
        help="attention kernels (auto: the fastest measured for the GPU)",
    )
    config_option(
        "--max-waiting-requests", type=int, help="waiting-queue bound; beyond it Generate answers RESOURCE_EXHAUSTED"
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="tokens per streamed message (a request's first token is always sent at once); "
        "larger values cost the server less CPU per token at high concurrency",
    )
    add_limit_options(p, RequestLimits)
    p.add_argument(
        "--engine-in-thread",
        action="store_true",
        help="run the engine loop in a thread of the server process instead of its own process "
        "(saves a process; costs throughput at high concurrency: one interpreter lock for both)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for requests that give none")
    add_log_options(p)
    add_security_options(p)
    args = p.parse_args(argv)
    args.security = parse_or_exit(p, server_security, args)  # files read now: bad ones exit 2 before loading
    return args


async def serve(args: argparse.Namespace) -> int:
    from engine_service.core.engine import LLMEngine
    from engine_service.server import start_engine_server
    from service_common.metrics import start_metrics_server
    from service_common.server import serve_until_signal

    config = EngineConfig(  # validated here, before anything listens: bad options fail fast
        model=args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_block_size=args.kv_block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager,
        attention_backend=args.attention_backend,
        max_waiting_requests=args.max_waiting_requests,
        seed=args.seed,
        async_scheduling=args.async_scheduling,
    )
    metrics_port = start_metrics_server(args.metrics_port, args.host)
    engine = (lambda: LLMEngine(config)) if args.engine_in_thread else config
    running = await start_engine_server(
        engine,
        args.model,
        model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        config=server_config(args, args.security),
        log_level=args.log_level,
        log_format=args.log_format,
        stream_interval=args.stream_interval,
        limits=limits_from_args(RequestLimits, args),
    )
    log.info(
        "listening; loading the model", extra={"address": f"{args.host}:{running.port}", "metrics_port": metrics_port}
    )
    serving = asyncio.ensure_future(
        serve_until_signal(
            running.server, running.health, args.grace_period, on_grace_end=running.abort_all, until=running.died.wait()
        )
    )
    loading = asyncio.ensure_future(running.wait_until_ready())
    done, _ = await asyncio.wait({serving, loading}, return_when=asyncio.FIRST_COMPLETED)
    if loading in done and loading.exception() is not None:
        log.error("engine failed to load: %s", loading.exception())
        await running.stop(0)
        serving.cancel()
        return 1
    await serving
    loading.cancel()  # a signal during loading: this cancels the load too
    await running.stop(0)  # after the graceful stop: the engine and background tasks (the server is already stopped)
    if running.died.is_set():  # a supervisor restarts us; staying up NOT_SERVING would serve no one
        log.error("exiting after the engine's death")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from service_common.logging import configure_logging

    configure_logging(args.log_level, args.log_format)
    try:
        return asyncio.run(serve(args))
    except ValueError as exc:  # bad options: say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. "cannot listen on 127.0.0.1:50051: address already in use"
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed: nothing was serving yet
        return 130


if __name__ == "__main__":
    sys.exit(main())
