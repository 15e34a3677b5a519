"""Stop strings ended in the engine: a request's output is detokenized as it streams, and the token that
completes a stop string ends the request there (the servicer then aborts the engine request).

Where this runs, and why: in the engine server's process, per stream, on the event loop, only for requests
that carry stop strings. The GPU loop stays free of text work, and one ``DecodeStream`` step costs about a
microsecond per token, far below a decode step. The price is at most one step of overshoot (the engine may
sample a token or two more before the abort reaches it); those tokens are dropped, never sent.

The text code is the tokenizer service's own (``IncrementalDetokenizer``: never half a UTF-8 character;
``StopStringMatcher``: a match is found however the text is split), so both front ends stop at the same
place. ``min_tokens``: like vLLM, stop strings are looked for only in text from the ``min_tokens``-th
output token on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tokenizers

from tokenizer_service.detokenizer import IncrementalDetokenizer
from tokenizer_service.stop_strings import StopMatch, StopStringMatcher


@dataclass(frozen=True)
class StopHit:
    keep: int  # how many of the tokens just pushed belong to the output (the last one completed the match)
    stop: str  # the stop string that matched


class StopWatch:
    """Feed a request's output token ids as they arrive; learn where a stop string ends it."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        stops: Sequence[str],
        min_tokens: int = 0,
        skip_special_tokens: bool = True,
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._matcher = StopStringMatcher(stops)
        self._min_tokens = min_tokens
        self._seen = 0

    def push(self, token_ids: Sequence[int]) -> StopHit | None:
        """None, or where among ``token_ids`` the first stop string completed."""
        for i, token_id in enumerate(token_ids):
            text = self._detokenizer.push([token_id])
            self._seen += 1
            if self._seen < self._min_tokens or not text:
                continue
            result = self._matcher.push(text)
            if isinstance(result, StopMatch):
                return StopHit(i + 1, result.stop)
        return None
