"""The real SMG gateway (smg 1.13, the binary from PyPI) in front of 2 real engine replicas on the demo model,
through the ``openai`` client, as ``python -m engine_service.cluster`` runs them (issue 13's "Done when").

The replicas are separate processes (``python -m engine_service``), so one can be killed and restarted; our
tokenizer service runs in front of replica 0 to give the reference greedy text.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
import tokenizers

from clients import TokenizerClient
from engine_service.cluster import ClusterConfig, start_replica, stop_all, wait_serving
from qwen3serve.engine.v1 import engine_pb2, engine_pb2_grpc
from qwen3serve.smg import common_pb2, vllm_engine_pb2, vllm_engine_pb2_grpc
from tests.serving import free_port

pytestmark = pytest.mark.timeout(240)

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


class Cluster:
    def __init__(self, config: ClusterConfig, logs: Path) -> None:
        self.config, self.logs = config, logs
        self.replicas: list[subprocess.Popen] = []
        self.others: list[subprocess.Popen] = []

    def start_replica(self, i: int) -> subprocess.Popen:
        log = open(self.logs / f"replica{i}.log", "ab")
        process = start_replica(self.config, i, stdout=log, stderr=subprocess.STDOUT)
        wait_serving(self.engine(i), 120, process)
        return process

    def engine(self, i: int) -> str:
        return f"127.0.0.1:{self.config.engine_port(i)}"

    def num_running(self, i: int) -> int:
        with grpc.insecure_channel(self.engine(i)) as channel:
            load = engine_pb2_grpc.EngineServiceStub(channel).GetLoad(engine_pb2.GetLoadRequest(), timeout=5)
        return load.num_running + load.num_waiting


@pytest.fixture(scope="module")
def cluster(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("cluster-logs")
    first = free_port()
    config = ClusterConfig(
        str(demo_checkpoint),
        replicas=2,
        first_engine_port=first,
        http_port=free_port(),
        prometheus_port=free_port(),
        served_model_name="demo",
    )
    c = Cluster(config, logs)
    try:
        c.replicas = [c.start_replica(i) for i in range(config.replicas)]
        tokenizer_port = free_port()
        c.others.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tokenizer_service",
                    "--model",
                    str(demo_checkpoint),
                    "--engine",
                    c.engine(0),
                    "--port",
                    str(tokenizer_port),
                ],
                stdout=open(logs / "tokenizer.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        )
        c.tokenizer = f"127.0.0.1:{tokenizer_port}"  # type: ignore[attr-defined]
        c.others.append(
            subprocess.Popen(config.smg_command(), stdout=open(logs / "smg.log", "wb"), stderr=subprocess.STDOUT)
        )
        c.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{config.http_port}/v1",
            api_key="none",  # type: ignore[attr-defined]
            max_retries=0,
            timeout=60,
        )
        deadline = time.monotonic() + 60
        while True:  # SMG up, both workers registered
            try:
                c.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1)  # type: ignore[attr-defined]
                break
            except (openai.APIConnectionError, openai.APIStatusError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        wait_serving(c.tokenizer, 60)  # type: ignore[attr-defined]
        yield c
    finally:
        stop_all(c.others + c.replicas)


def reference_chat(cluster: Cluster, max_tokens: int) -> tuple[str, int]:
    """Greedy text (reasoning + answer) and completion tokens from our own tokenizer service's Chat."""
    with TokenizerClient(cluster.tokenizer) as client:  # type: ignore[attr-defined]
        text, usage = "", 0
        for r in client.chat(MESSAGES, max_tokens=max_tokens, temperature=0):
            text += r.reasoning_text + r.text
            usage = r.usage.completion_tokens or usage
    return text, usage


def test_chat_non_streaming_and_streaming_match_our_tokenizer_service(cluster: Cluster) -> None:
    expected, expected_tokens = reference_chat(cluster, 12)
    assert expected_tokens == 12
    reply = cluster.client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=12,  # type: ignore[attr-defined]
        temperature=0,
    )
    message = reply.choices[0].message
    assert (getattr(message, "reasoning_content", None) or "") + (message.content or "") == expected
    assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"

    text, usage = "", None
    for chunk in cluster.client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=12,  # type: ignore[attr-defined]
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in chunk.choices:
            text += (getattr(choice.delta, "reasoning_content", None) or "") + (choice.delta.content or "")
        usage = chunk.usage or usage
    assert text == expected
    assert usage is not None and usage.completion_tokens == 12


def test_completion_and_a_stop_string_ended_in_the_engine(cluster: Cluster) -> None:
    full = cluster.client.completions.create(
        model="demo",
        prompt="Once upon a time",
        max_tokens=24,  # type: ignore[attr-defined]
        temperature=0,
    )
    assert full.usage.completion_tokens == 24 and full.choices[0].finish_reason == "length"
    text = full.choices[0].text
    stop = text[len(text) // 3 : len(text) // 3 + 2]
    assert stop.strip(), text
    stopped = cluster.client.completions.create(
        model="demo",
        prompt="Once upon a time",
        max_tokens=24,  # type: ignore[attr-defined]
        temperature=0,
        stop=[stop],
    )
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.model_extra.get("matched_stop") == stop
    assert stopped.usage.completion_tokens < 24
    assert text.startswith(choice.text) and stop not in choice.text


# n and response_format are served now (SMG caps n at 10, below our --max-n of 16:
# tests/test_parallel_sampling_service.py checks our limit on VllmEngine directly); a schema over the engine's
# --max-constraint-bytes (64 KiB) is refused before any work, and SMG must pass that on as a 4xx naming the field.
HUGE_SCHEMA = {"type": "object", "description": "x" * 70_000}
HUGE_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": HUGE_SCHEMA}}


@pytest.mark.parametrize(
    "extra, field",
    [({"response_format": HUGE_FORMAT}, "json_schema")],
)
def test_unsupported_fields_are_a_4xx_naming_the_field(cluster: Cluster, extra: dict, field: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        cluster.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4, **extra)  # type: ignore[attr-defined]
    assert field in str(err.value)


# A schema within the limits that xgrammar cannot compile: the engine fails it in its compile pool, after the
# Generate RPC began. SMG must still answer at once with a 4xx carrying the compiler's words (it used to leave
# the client waiting until its timeout), and the engine request must be gone.
UNCOMPILABLE_SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}
UNCOMPILABLE_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": UNCOMPILABLE_SCHEMA}}


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_that_does_not_compile_is_a_prompt_4xx(cluster: Cluster, stream: bool) -> None:
    client = cluster.client.with_options(timeout=15)  # type: ignore[attr-defined]  # a hang fails fast
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as err:
        reply = client.chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=4, response_format=UNCOMPILABLE_FORMAT, stream=stream
        )
        for _ in reply if stream else ():
            pass
    assert time.monotonic() - started < 10
    assert "json_schema" in str(err.value) and "parenthesis is not closed" in str(err.value), str(err.value)
    wait_for(lambda: cluster.num_running(0) + cluster.num_running(1) == 0, "the failed request stayed in an engine")


@pytest.mark.parametrize("stream", [False, True])
def test_n_2_gives_two_choices_each_with_its_own_finish(cluster: Cluster, stream: bool) -> None:
    kwargs = dict(model="demo", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=5, n=2)
    if not stream:
        reply = cluster.client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        texts = {c.index: (c.message.reasoning_content or "") + (c.message.content or "") for c in reply.choices}
        finishes = {c.index: c.finish_reason for c in reply.choices}
        assert reply.usage.completion_tokens == 16  # both samples' tokens
    else:
        texts, finishes = {0: "", 1: ""}, {}
        for chunk in cluster.client.chat.completions.create(stream=True, **kwargs):  # type: ignore[call-overload]
            for c in chunk.choices:
                texts[c.index] += (getattr(c.delta, "reasoning_content", None) or "") + (c.delta.content or "")
                if c.finish_reason:
                    finishes[c.index] = c.finish_reason
    assert finishes == {0: "length", 1: "length"}
    assert texts[0] and texts[1] and texts[0] != texts[1]  # two independent samples (seeds 5 and 6)


def test_client_disconnect_aborts_the_engine_request(cluster: Cluster) -> None:
    stream = cluster.client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=3000,  # type: ignore[attr-defined]
        temperature=0,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert cluster.num_running(0) + cluster.num_running(1) == 1
    stream.close()
    deadline = time.monotonic() + 10
    while cluster.num_running(0) + cluster.num_running(1):
        assert time.monotonic() < deadline, "the engine request outlived its client"
        time.sleep(0.2)


def test_shared_prefix_hits_the_cache_from_the_second_request_on(cluster: Cluster) -> None:
    prefix = "You are a helpful assistant. " * 30
    cached = []
    for question in ("What is 2+2?", "Name a colour.", "Say hi."):
        reply = cluster.client.chat.completions.create(  # type: ignore[attr-defined]
            model="demo",
            max_tokens=2,
            temperature=0,
            messages=[{"role": "system", "content": prefix}, {"role": "user", "content": question}],
        )
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
    assert cached[0] == 0 or cached[0] is None
    assert all(c and c > 0 for c in cached[1:]), cached


def smg_index_blocks(cluster: Cluster, i: int) -> int:
    """How many of replica ``i``'s cached blocks SMG's KV index holds (its ``smg_kv_index_blocks`` gauge, fed
    only by the replica's SubscribeKvEvents stream)."""
    url = f"http://127.0.0.1:{cluster.config.prometheus_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    found = re.search(rf'^smg_kv_index_blocks{{worker="grpc://{re.escape(cluster.engine(i))}"}} (\d+)', text, re.M)
    return int(found.group(1)) if found else 0


def wait_for(predicate, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_smg_routes_a_prefix_to_the_replica_whose_kv_events_stored_it(cluster: Cluster, demo_checkpoint: Path) -> None:
    """Each replica is given a long prompt of its own straight over gRPC (SMG never sees those requests):
    only its KV events can tell SMG where the prefix lives. Requests through SMG that share a prefix then
    hit the cache (cached_tokens > 0) on both replicas: SMG sent each to the replica that stored it. A
    FlushCache on a replica empties SMG's index of it (the all-cleared event)."""
    tokenizer = tokenizers.Tokenizer.from_file(str(demo_checkpoint / "tokenizer.json"))
    prefixes = [f"Replica {i} keeps this story about {topic}. " * 12 for i, topic in enumerate(("owls", "rivers"))]
    full_blocks = []
    for i, prefix in enumerate(prefixes):
        before = smg_index_blocks(cluster, i)
        ids = tokenizer.encode(prefix).ids
        full_blocks.append(len(ids) // 16)
        with grpc.insecure_channel(cluster.engine(i)) as channel:
            for _ in engine_pb2_grpc.EngineServiceStub(channel).Generate(
                engine_pb2.GenerateRequest(
                    prompt_token_ids=ids, sampling_params=engine_pb2.SamplingParams(max_tokens=1)
                ),
                timeout=30,
            ):
                pass
        wait_for(lambda: smg_index_blocks(cluster, i) >= before + len(ids) // 16, f"SMG never indexed replica {i}")
    for question in ("Who?", "Why?"):
        for i, prefix in enumerate(prefixes):
            reply = cluster.client.completions.create(  # type: ignore[attr-defined]
                model="demo", prompt=prefix + question, max_tokens=1, temperature=0
            )
            assert reply.usage.prompt_tokens_details.cached_tokens >= 16 * full_blocks[i], (i, question, reply.usage)

    with grpc.insecure_channel(cluster.engine(1)) as channel:
        flushed = vllm_engine_pb2_grpc.VllmEngineStub(channel).FlushCache(common_pb2.FlushCacheRequest(), timeout=10)
    assert flushed.success, flushed.message
    wait_for(lambda: smg_index_blocks(cluster, 1) == 0, "SMG kept replica 1's blocks after FlushCache")
    assert smg_index_blocks(cluster, 0) > 0


def test_killed_replica_fails_over_and_rejoins(cluster: Cluster) -> None:
    cluster.replicas[1].kill()
    cluster.replicas[1].wait()
    for i in range(6):  # every request after the kill succeeds on the other replica
        reply = cluster.client.chat.completions.create(  # type: ignore[attr-defined]
            model="demo", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=2, temperature=0
        )
        assert reply.usage.completion_tokens == 2
    cluster.replicas[1] = cluster.start_replica(1)
    deadline = time.monotonic() + 30
    while last_generate_at(cluster, 1) == 0:  # SMG sends work to the restarted replica again
        assert time.monotonic() < deadline, "the restarted replica got no traffic"
        cluster.client.chat.completions.create(  # type: ignore[attr-defined]
            model="demo", messages=[{"role": "user", "content": f"again {time.monotonic()}"}], max_tokens=1
        )


def last_generate_at(cluster: Cluster, i: int) -> float:
    """When replica ``i`` last received a Generate from SMG (0: never, since it started)."""
    with grpc.insecure_channel(cluster.engine(i)) as channel:
        info = vllm_engine_pb2_grpc.VllmEngineStub(channel).GetServerInfo(
            vllm_engine_pb2.GetServerInfoRequest(), timeout=5
        )
    return info.last_receive_timestamp


def test_readme_openai_snippet_runs_against_the_cluster(cluster: Cluster) -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## OpenAI API through SMG") :]
    snippet = section[section.index("```python\n") + 10 :]
    snippet = snippet[: snippet.index("```")]
    snippet = snippet.replace("http://127.0.0.1:30000", f"http://127.0.0.1:{cluster.config.http_port}")
    snippet = snippet.replace('"demo-model"', '"demo"')
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r" \d+$", result.stdout, re.MULTILINE), result.stdout  # content, completion tokens
