"""Folding deltas into fewer messages (the event loop's backlog, the engine side's stream interval):
nothing lost, nothing reordered, errors and final deltas still delivered."""

from __future__ import annotations

import asyncio

import pytest

from engine_service.async_engine import _merge_ready
from engine_service.core.engine_loop import DeltaBatcher, EngineLoop
from engine_service.protocol import (
    EngineDeadError,
    EngineStopped,
    FinishReason,
    RequestOutput,
    StepOutputs,
    TokenLogprob,
)


async def test_queued_deltas_fold_into_one_message_in_order() -> None:
    stream: asyncio.Queue = asyncio.Queue()
    for token in (2, 3):
        stream.put_nowait(RequestOutput("r", [token]))
    stream.put_nowait(
        RequestOutput(
            "r", [4], finished=True, finish_reason=FinishReason.LENGTH, num_prompt_tokens=7, num_output_tokens=4
        )
    )
    [merged] = _merge_ready(RequestOutput("r", [1]), stream)
    assert merged.new_token_ids == [1, 2, 3, 4]
    assert merged.finished and merged.finish_reason is FinishReason.LENGTH and merged.num_output_tokens == 4
    assert stream.empty()


async def test_deltas_of_parallel_samples_fold_per_sample() -> None:
    stream: asyncio.Queue = asyncio.Queue()
    for out in (
        RequestOutput("r", [10], index=1),
        RequestOutput("r", [2]),
        RequestOutput("r", [], finished=True, finish_reason=FinishReason.STOP, index=1),
        RequestOutput("r", [3]),
    ):
        stream.put_nowait(out)
    merged = _merge_ready(RequestOutput("r", [1]), stream)
    assert [(m.index, m.new_token_ids, m.finished) for m in merged] == [(0, [1, 2, 3], False), (1, [10], True)]


async def test_an_error_after_tokens_is_delivered_next() -> None:
    stream: asyncio.Queue = asyncio.Queue()
    stream.put_nowait(RequestOutput("r", [2]))
    stream.put_nowait(EngineDeadError("gone"))
    merged, error = _merge_ready(RequestOutput("r", [1]), stream)
    assert merged.new_token_ids == [1, 2] and not merged.finished
    assert isinstance(error, EngineDeadError)  # after the tokens before it


def test_delta_batcher_sends_the_first_token_then_groups_and_flushes_on_finish() -> None:
    batcher = DeltaBatcher(3)
    lp = [TokenLogprob(t, -1.0, ()) for t in range(20)]
    sent: list[list[RequestOutput]] = []
    for step in range(7):  # "a" gets a token (with its logprob) every step and finishes in step 6
        out = RequestOutput("a", [step], [lp[step]])
        if step == 6:
            out.finished, out.finish_reason = True, FinishReason.LENGTH
        sent.append(batcher.ready([out]))
    assert [[o.new_token_ids for o in step] for step in sent] == [[[0]], [], [], [[1, 2, 3]], [], [], [[4, 5, 6]]]
    a = [o for step in sent for o in step]
    assert [[x.token_id for x in o.new_logprobs or []] for o in a] == [[0], [1, 2, 3], [4, 5, 6]]
    assert a[-1].finished and a[-1].finish_reason is FinishReason.LENGTH
    assert not batcher._held and not batcher._started
    assert batcher.ready([RequestOutput("a", [9])]) == [RequestOutput("a", [9])]  # a new request "a" starts afresh


def test_delta_batcher_holds_each_sample_of_a_request_apart() -> None:
    batcher = DeltaBatcher(2)
    assert len(batcher.ready([RequestOutput("a", [1]), RequestOutput("a", [10], index=1)])) == 2  # first tokens
    assert batcher.ready([RequestOutput("a", [2]), RequestOutput("a", [11], index=1)]) == []  # both held
    final = batcher.final(RequestOutput("a", [], finished=True, finish_reason=FinishReason.ABORTED, index=1))
    assert (final.index, final.new_token_ids, final.finished) == (1, [11], True)  # its own tokens only
    [sample0] = batcher.ready([RequestOutput("a", [3])])
    assert (sample0.index, sample0.new_token_ids) == (0, [2, 3])


def test_delta_batcher_sends_what_a_request_holds_when_it_gets_no_token_or_ends() -> None:
    batcher = DeltaBatcher(4)
    assert len(batcher.ready([RequestOutput("a", [1]), RequestOutput("b", [10])])) == 2  # first tokens
    assert batcher.ready([RequestOutput("a", [2]), RequestOutput("b", [11])]) == []  # both held
    # "b" is preempted: no token this step, so its held token goes now rather than after its recompute
    assert batcher.ready([RequestOutput("a", [3])]) == [RequestOutput("b", [11])]
    # "a" is aborted: its final delta carries what it held
    final = batcher.final(RequestOutput("a", [], finished=True, finish_reason=FinishReason.ABORTED))
    assert final.new_token_ids == [2, 3] and final.finish_reason is FinishReason.ABORTED
    assert batcher.ready([RequestOutput("b", [12])]) == []
    assert batcher.release_all() == [RequestOutput("b", [12])]  # the engine stops: nothing is kept back
    assert not batcher._held and not batcher._started


def test_delta_batcher_of_one_passes_outputs_through() -> None:
    outputs = [RequestOutput("a", [1]), RequestOutput("b", [2])]
    assert DeltaBatcher(1).ready(outputs) is outputs
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="stream_interval"):
            DeltaBatcher(bad)  # type: ignore[arg-type]


class _DyingEngine:
    """Gives request "r" one token per step, then dies in step 4."""

    dead_reason = None

    def __init__(self) -> None:
        self.steps = 0

    def has_unfinished_requests(self) -> bool:
        return True

    def stats(self) -> str:
        return "stats"

    def take_failed(self) -> list[tuple[str, Exception]]:
        return []

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.steps == 4:
            raise EngineDeadError("a worker died")
        return [RequestOutput("r", [self.steps])]

    def pop_embeddings(self) -> list:
        return []


def test_engine_loop_sends_held_tokens_before_reporting_death() -> None:
    events: list[object] = []
    EngineLoop(_DyingEngine(), lambda timeout: None, events.append, stream_interval=8).run()  # type: ignore[arg-type]
    assert events == [
        StepOutputs([RequestOutput("r", [1])], "stats"),
        StepOutputs([RequestOutput("r", [2, 3])], "stats"),
        EngineStopped("a worker died", died=True),
    ]
