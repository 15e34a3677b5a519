"""The process boundary's byte form of engine events (``encode_event`` / ``decode_event``): the one place
that turns the events of ``engine_service.protocol`` into bytes and back; torch-free."""

from __future__ import annotations

import pickle
from typing import cast

from engine_service.protocol import Event, RequestFailed, RequestOutput, StepOutputs

_PLAIN_DELTAS = "plain-deltas"


def encode_event(event: Event) -> bytes:
    """The pipe form of an event. A step's plain deltas (tokens only, not final) travel as flat lists,
    which pickle in microseconds where 256 ``RequestOutput`` objects took about a millisecond each side."""
    if isinstance(event, StepOutputs):
        ids: list[str] = []
        indices: list[int] = []
        counts: list[int] = []
        tokens: list[int] = []
        others: list[RequestOutput] = []
        for out in event.outputs:
            if not out.finished and out.new_logprobs is None and out.prompt_logprobs is None:
                ids.append(out.request_id)
                indices.append(out.index)
                counts.append(len(out.new_token_ids))
                tokens += out.new_token_ids
            else:
                others.append(out)
        payload: object = (_PLAIN_DELTAS, ids, counts, tokens, others, event.stats, indices)
    elif isinstance(event, RequestFailed):
        payload = RequestFailed(event.internal_id, _portable_error(event.error))
    else:
        payload = event
    return pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)


def _portable_error(error: Exception) -> Exception:
    """``error`` if the server process can rebuild it from its pickle, else a RuntimeError with its text (an
    internal error, logged there): an event that fails to unpickle is lost, and its request would wait forever."""
    try:
        pickle.loads(pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # any failure to rebuild (e.g. an __init__ that does not take its args): send the text
        return RuntimeError(f"{type(error).__name__} (which does not cross the process boundary): {error}")
    return error


def decode_event(data: bytes) -> Event:
    payload = pickle.loads(data)
    if isinstance(payload, tuple) and payload and payload[0] == _PLAIN_DELTAS:
        _, ids, counts, tokens, others, stats, indices = payload
        outputs, start = [], 0
        for internal_id, index, count in zip(ids, indices, counts):
            outputs.append(RequestOutput(internal_id, tokens[start : start + count], index=index))
            start += count
        return StepOutputs(outputs + others, stats)
    return cast(Event, payload)  # the other events are pickled as they are
