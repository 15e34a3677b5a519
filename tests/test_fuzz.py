"""The seeded fuzzer (tests/fuzzer.py) against both real services over loopback sockets, demo model on CPU.

`make test` sends 1,000 requests (seed 0); `make fuzz SEED=S N=K` sends K of seed S and prints the tally.
Afterwards: no answer outside the documented statuses (never INTERNAL or UNKNOWN), no hang, no ERROR logged
by the services, both servers SERVING and still generating, the engine alive and its KV pool full.
A finding names its (seed, index); ``fuzzer.draw(seed, index)`` rebuilds the request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from fuzz_inputs import Sizes
from fuzzer import Tally, fuzz
from grpc_health.v1 import health_pb2
from serving import Services, health_status, start_services, wait_until

from engine_service.server import SERVICE_NAME as ENGINE_SERVICE
from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from tokenizer_service.chat_template import ChatTokenizer

N = int(os.environ.get("QWEN3SERVE_FUZZ_N", "1000"))
SEED = int(os.environ.get("QWEN3SERVE_FUZZ_SEED", "0"))
MAX_MODEL_LEN = 256
# Loggers of our services: an ERROR from them is a traceback nobody asked for.
SERVICE_LOGGERS = ("engine_service", "tokenizer_service", "service_common")

pytestmark = pytest.mark.asyncio(loop_scope="module")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzzed(demo_checkpoint: Path, tokenizer: ChatTokenizer) -> AsyncIterator[tuple[Services, Tally, list]]:
    """Both services, fuzzed once for the module: (services, tally, ERROR records of the services)."""
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    services = await start_services(
        demo_checkpoint, tokenizer, max_model_len=MAX_MODEL_LEN, num_kv_blocks=64, max_waiting_requests=16
    )
    try:
        tally = await fuzz(
            services.engine_target, services.tokenizer_target, N, SEED, sizes=Sizes(max_model_len=MAX_MODEL_LEN)
        )
        print(f"\n{tally.summary()}")
        for finding in tally.findings[:50]:
            print(finding)
        yield services, tally, [r for r in errors.records if r.name.startswith(SERVICE_LOGGERS)]
    finally:
        logging.getLogger().removeHandler(errors)
        await services.stop()


@pytest.mark.timeout(max(300, N // 10))
async def test_fuzzed_requests_get_only_documented_statuses(fuzzed) -> None:
    _, tally, _ = fuzzed
    assert tally.total == N
    parsed = [f for f in tally.findings if f.mode != "unparseable"]
    assert not parsed, "\n".join(map(str, parsed[:20]))
    assert tally.status_count("INTERNAL") == 0


async def test_unparseable_bodies_are_invalid_argument(fuzzed) -> None:
    _, tally, _ = fuzzed
    unparseable = [f for f in tally.findings if f.mode == "unparseable"]
    assert not unparseable, "\n".join(map(str, unparseable[:20]))
    assert tally.status_count("INTERNAL", "UNKNOWN") == 0


async def test_after_fuzzing_both_servers_serve_and_every_kv_block_is_free(fuzzed) -> None:
    services, tally, errors = fuzzed
    assert services.engine.servicer.engine.dead_reason is None
    assert await health_status(services.engine_target, ENGINE_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    assert await health_status(services.tokenizer_target) == health_pb2.HealthCheckResponse.SERVING
    blocks = services.core.block_manager
    await wait_until(lambda: blocks.num_free_blocks == blocks.num_blocks, what="every KV block free")
    async with grpc.aio.insecure_channel(services.engine_target) as channel:
        responses = [
            r
            async for r in engine_pb2_grpc.EngineServiceStub(channel).Generate(
                engine_pb2.GenerateRequest(
                    prompt_token_ids=[9707, 11],
                    sampling_params=engine_pb2.SamplingParams(max_tokens=3, ignore_eos=True),
                )
            )
        ]
    assert sum(len(r.token_ids) for r in responses) == 3
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors[:10]]
    assert tally.status_count("UNAVAILABLE") == 0  # nothing was down
