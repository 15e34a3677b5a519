"""Split Qwen3's streamed output into reasoning (``<think>...</think>``) and the answer.

Qwen3 writes ``<think>\\nREASONING\\n</think>\\n\\nANSWER``. Some templates (Qwen3 thinking-only
releases) already end the prompt with ``<think>``, so the output starts inside the reasoning and only
``</think>`` appears; with ``enable_thinking=False`` the prompt holds an empty, closed block and the
output is all answer. The tags may reach the splitter cut anywhere (stop-string hold-back, other
tokenizers), so a possible partial tag is held back until it is decided.

The newlines around the tags are left out (reasoning is stripped of leading and trailing newlines,
the answer of leading ones): exactly what Qwen3's template puts back when the message is rendered
again with ``reasoning_content``.
"""

from __future__ import annotations

import enum

from tokenizer_service.stop_strings import partial_tag_suffix

THINK_START = "<think>"
THINK_END = "</think>"


def prompt_opens_thinking(prompt: str) -> bool:
    """True when the prompt ends inside an open ``<think>`` block (the output starts as reasoning)."""
    start = prompt.rfind(THINK_START)
    return start >= 0 and prompt.find(THINK_END, start) < 0


class _State(enum.Enum):
    START = "start"  # before any output: a <think> may still come (after whitespace)
    REASONING = "reasoning"
    ANSWER_START = "answer_start"  # right after </think>: newlines are dropped
    ANSWER = "answer"


class ReasoningSplitter:
    """Feed text deltas; get (reasoning delta, answer delta) pairs."""

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        self._state = _State.REASONING if starts_in_reasoning else _State.START
        self._reasoning_started = False  # leading newlines of the reasoning are dropped until then
        self._held = ""

    def push(self, text: str) -> tuple[str, str]:
        buf, self._held = self._held + text, ""
        reasoning: list[str] = []
        answer: list[str] = []
        while buf:
            if self._state is _State.START:
                body = buf.lstrip()
                if body.startswith(THINK_START):
                    self._state, buf = _State.REASONING, body[len(THINK_START) :]
                elif THINK_START.startswith(body):  # only whitespace, or a partial "<think>" so far
                    self._held, buf = buf, ""
                else:
                    self._state = _State.ANSWER
            elif self._state is _State.REASONING:
                if not self._reasoning_started:
                    buf = buf.lstrip("\n")
                    if not buf:
                        break
                    self._reasoning_started = True
                end = buf.find(THINK_END)
                if end >= 0:
                    reasoning.append(buf[:end].rstrip("\n"))
                    self._state, buf = _State.ANSWER_START, buf[end + len(THINK_END) :]
                    continue
                # Hold a partial "</think>" and the newlines before it: they are dropped if the tag completes.
                keep = len(buf) - partial_tag_suffix(buf, THINK_END)
                keep = len(buf[:keep].rstrip("\n"))
                reasoning.append(buf[:keep])
                self._held, buf = buf[keep:], ""
            elif self._state is _State.ANSWER_START:
                buf = buf.lstrip("\n")
                if buf:
                    self._state = _State.ANSWER
            else:
                answer.append(buf)
                buf = ""
        return "".join(reasoning), "".join(answer)

    def finish(self) -> tuple[str, str]:
        """End of stream: what was held back was not a tag after all (trailing newlines are dropped)."""
        held, self._held = self._held, ""
        if self._state is _State.REASONING:
            return held.rstrip("\n"), ""
        return "", held  # START: whitespace or a partial "<think>", part of the answer
