"""Folding deltas into fewer messages (the event loop's backlog, the engine side's stream interval):
nothing lost, nothing reordered, errors and final deltas still delivered."""

from __future__ import annotations

import asyncio

import pytest

from engine_service.async_engine import DeltaBatcher, _merge_ready
from engine_service.engine import EngineDeadError, RequestOutput, TokenLogprob
from engine_service.sequence import FinishReason


async def test_queued_deltas_fold_into_one_message_in_order() -> None:
    stream: asyncio.Queue = asyncio.Queue()
    for token in (2, 3):
        stream.put_nowait(RequestOutput("r", [token]))
    stream.put_nowait(RequestOutput("r", [4], finished=True, finish_reason=FinishReason.LENGTH,
                                    num_prompt_tokens=7, num_output_tokens=4))
    merged = _merge_ready(RequestOutput("r", [1]), stream)
    assert merged.new_token_ids == [1, 2, 3, 4]
    assert merged.finished and merged.finish_reason is FinishReason.LENGTH and merged.num_output_tokens == 4
    assert stream.empty()


async def test_an_error_after_tokens_is_delivered_next() -> None:
    stream: asyncio.Queue = asyncio.Queue()
    stream.put_nowait(RequestOutput("r", [2]))
    stream.put_nowait(EngineDeadError("gone"))
    merged = _merge_ready(RequestOutput("r", [1]), stream)
    assert merged.new_token_ids == [1, 2] and not merged.finished
    assert isinstance(stream.get_nowait(), EngineDeadError)


def test_delta_batcher_sends_the_first_token_then_groups_and_flushes_on_finish() -> None:
    batcher = DeltaBatcher(3)
    lp = [TokenLogprob(t, -1.0, ()) for t in range(20)]
    sent: list[RequestOutput] = []
    for step in range(7):  # "a" gets a token (with its logprob) every step; "b" only in steps 0-1, then aborts
        outputs = [RequestOutput("a", [step], [lp[step]])]
        if step < 2:
            outputs.append(RequestOutput("b", [100 + step]))
        if step == 3:
            outputs.append(RequestOutput("b", [], finished=True, finish_reason=FinishReason.ABORTED))
        if step == 6:
            outputs[0].finished, outputs[0].finish_reason = True, FinishReason.LENGTH
        sent += batcher.ready(outputs)
    a = [o for o in sent if o.request_id == "a"]
    assert [o.new_token_ids for o in a] == [[0], [1, 2, 3], [4, 5, 6]]
    assert [[x.token_id for x in o.new_logprobs or []] for o in a] == [[0], [1, 2, 3], [4, 5, 6]]
    assert a[-1].finished and a[-1].finish_reason is FinishReason.LENGTH
    b = [o for o in sent if o.request_id == "b"]
    assert [o.new_token_ids for o in b] == [[100], [101]]  # the held token leaves with the abort
    assert b[-1].finished and b[-1].finish_reason is FinishReason.ABORTED
    assert batcher.ready([RequestOutput("a", [9])]) == [RequestOutput("a", [9])]  # a new request "a" starts afresh


def test_delta_batcher_of_one_passes_outputs_through() -> None:
    outputs = [RequestOutput("a", [1]), RequestOutput("b", [2])]
    assert DeltaBatcher(1).ready(outputs) is outputs
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="stream_interval"):
            DeltaBatcher(bad)  # type: ignore[arg-type]
