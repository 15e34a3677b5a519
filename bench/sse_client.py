"""A streaming ``/v1/completions`` client over HTTP/1.1 and server-sent events, with asyncio streams alone (the
lent GPU machine has no openai/httpx), and the client process bench/smg_throughput.py runs it in."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time

from service_throughput import _own_cpu_seconds, client_result, run_client

#: the model name the benchmark's SMG serves
SERVED_NAME = "bench"


async def completion(port: int, body: dict, with_times: bool = False) -> tuple[int, float, list[float], float, int]:
    """One streaming /v1/completions over HTTP/1.1: (completion tokens, TTFT, inter-chunk gaps, end time,
    prompt tokens), the counts from the final usage chunk. ``with_times``: the text chunks' arrival times
    (perf_counter) instead of the gaps."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"SMG answered {status!r}: {(await reader.read(2000))!r}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
    ttft, last, gaps, usage, buffer = None, t0, [], None, b""
    while True:
        if chunked:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                break
            data = await reader.readexactly(size + 2)
            buffer += data[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                break
            buffer += data
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            now = time.perf_counter()
            if b'"usage":{' in event:  # the last chunk: counts only, no text
                usage = json.loads(event[6:])["usage"]
            elif b'"text":""' in event:  # the finish chunk
                continue
            elif with_times:
                gaps.append(now)
            elif ttft is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
    writer.close()
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return usage["completion_tokens"], ttft or 0.0, gaps, time.time(), usage["prompt_tokens"]


async def _http_client(port: int, jobs: list[tuple[str, int]], temperature: float, ready, go) -> dict:
    ready.put(os.getpid())
    await asyncio.to_thread(go.wait)  # every client process started: all streams open at once
    cpu_start = _own_cpu_seconds()
    bodies = [
        dict(
            model=SERVED_NAME,
            prompt=text,
            max_tokens=n,
            temperature=temperature,
            ignore_eos=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        for text, n in jobs
    ]
    results = await asyncio.gather(*(completion(port, body) for body in bodies))
    return {**client_result(results, cpu_start), "prompt_tokens": [r[4] for r in results]}


http_client_process = functools.partial(run_client, _http_client)  # the process body, for run_clients
