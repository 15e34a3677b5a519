"""Pull Qwen3's tool calls out of the streamed answer text.

Qwen3 (Hermes-style template) writes each call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
in its answer. When a Chat request offers tools, the text between the tags is withheld from the answer
stream and each complete block becomes a structured tool call (name + arguments as JSON text), as vLLM's
``hermes`` parser and SGLang's ``qwen25`` parser do. A block whose body is not such JSON is not a call:
it is passed on as answer text, tags included, so nothing the model wrote is lost (only the newlines
right after a parsed call, which separate calls, are dropped). Tags may arrive cut
anywhere, so a possible partial ``<tool_call>`` at the end of a delta is held back until it is decided.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from tokenizer_service.stop_strings import partial_tag_suffix

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    arguments_json: str  # a JSON object, serialized


def parse_tool_call(body: str) -> ParsedToolCall | None:
    """The call in one block's body, or None if it is not ``{"name": str, "arguments": object}`` JSON."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some models emit the arguments already serialized
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallParser:
    """Feed answer-text deltas; get (answer text delta, tool calls completed by this delta)."""

    def __init__(self) -> None:
        self._held = ""  # a possible partial start tag, or the body of an open block (with its tag)
        self._in_block = False
        self._after_call = False  # newlines right after a parsed call separate calls: dropped

    def push(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        buf, self._held = self._held + text, ""
        out: list[str] = []
        calls: list[ParsedToolCall] = []
        while buf:
            if self._after_call:
                buf = buf.lstrip("\n")
                if not buf:
                    break
                self._after_call = False
            if self._in_block:
                end = buf.find(TOOL_CALL_END)
                if end < 0:
                    self._held, buf = buf, ""
                    break
                block, buf = buf[: end + len(TOOL_CALL_END)], buf[end + len(TOOL_CALL_END) :]
                call = parse_tool_call(block[len(TOOL_CALL_START) : -len(TOOL_CALL_END)].strip())
                if call is None:
                    out.append(block)  # not a call: the model's own text
                else:
                    calls.append(call)
                    self._after_call = True
                self._in_block = False
                continue
            start = buf.find(TOOL_CALL_START)
            if start >= 0:
                out.append(buf[:start])
                self._in_block, buf = True, buf[start:]
                continue
            keep = len(buf) - partial_tag_suffix(buf, TOOL_CALL_START)
            out.append(buf[:keep])
            self._held, buf = buf[keep:], ""
        return "".join(out), calls

    def finish(self) -> str:
        """End of stream: an unterminated block or a partial tag is released as text."""
        held, self._held, self._in_block, self._after_call = self._held, "", False, False
        return held
