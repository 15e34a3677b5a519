"""Stop strings over streamed text: text that could still turn into a stop string is held back, so a
stop string is never emitted, not even its first characters, however the text is split into deltas.

Invariant: after each :meth:`StopStringMatcher.push`, the held-back text is the longest suffix of
the text so far that is a proper prefix of some stop string. Any later match must start inside it,
so everything before it is safe to emit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (what a streamed
    parser must hold back: it may still become ``tag``)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass(frozen=True)
class StopMatch:
    text: str  # the emittable text before the stop string
    stop: str  # which stop string matched


class StopStringMatcher:
    """Feed text deltas; get back what is safe to emit, or the match that ends generation."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(dict.fromkeys(stops))  # dedup, keep order
        self._held = ""
        self.matched: str | None = None

    def push(self, text: str) -> str | StopMatch:
        """Returns the text now safe to emit, or a StopMatch (after which nothing more is accepted)."""
        if self.matched is not None:
            raise RuntimeError("push() after a stop string matched")
        if not self._stops:
            return text
        buf = self._held + text
        # The match that completes first wins (ties: the one that starts first): generation would have
        # stopped there had the text come one character at a time, so the result does not depend on
        # how the text was split into deltas.
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            at = buf.find(stop)
            if at >= 0 and (best is None or (at + len(stop), at) < best[:2]):
                best = (at + len(stop), at, stop)
        if best is not None:
            self.matched = best[2]
            self._held = ""
            return StopMatch(buf[: best[1]], best[2])
        hold = max(partial_tag_suffix(buf, stop) for stop in self._stops)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def finish(self) -> str:
        """End of stream: the held-back text was not a stop string after all."""
        held, self._held = self._held, ""
        return held
