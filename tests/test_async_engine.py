"""AsyncEngine's folding of queued deltas: nothing lost, nothing reordered, errors still delivered."""

from __future__ import annotations

import asyncio

from engine_service.async_engine import _merge_ready
from engine_service.engine import EngineDeadError, RequestOutput
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
