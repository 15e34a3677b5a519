"""Request limits (:class:`~tokenizer_service.config.RequestLimits`), checked before any per-item work.

Every check is a count or a size (``len`` of a list, UTF-8 length of a string): linear in the
request's bytes at C speed, so even a request at the gRPC message limit is answered in milliseconds.
Counts are checked before the items they count, sizes before the text is tokenized, parsed or
rendered. A violation is an :class:`InvalidArgument` that names the field and the limit, and the
command-line option that sets it, e.g.
``messages[2].content: 2000000 bytes; the limit is 1048576 (--max-text-bytes)``.

:func:`check_json_depth` is the one check that looks inside a text: it runs on tool JSON (at most
``max_tool_json_bytes``) before ``json.loads``, whose C parser recurses once per nesting level and
would otherwise raise RecursionError (an INTERNAL status) on ``[[[[...``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import accumulate

from qwen3serve.tokenizer.v1 import tokenizer_pb2
from service_common.errors import InvalidArgument
from service_common.options import option_name
from tokenizer_service.config import RequestLimits


def utf8_len(text: str) -> int:
    """Size of ``text`` in UTF-8 (what the wire carried); lone surrogates count 3 bytes."""
    if text.isascii():  # O(1) in CPython: compact strings know whether they are ASCII
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def check_bytes(field: str, text: str, limits: RequestLimits, limit: str) -> int:
    """``text``'s UTF-8 size, or InvalidArgument if it is over the ``limit`` (a RequestLimits field name)."""
    allowed = getattr(limits, limit)
    if len(text) > allowed:  # never fewer bytes than code points: no need to encode a huge text
        raise InvalidArgument(
            field, f"{len(text)} characters, more than the limit of {allowed} bytes ({option_name(limit)})"
        )
    size = utf8_len(text)
    if size > allowed:
        raise InvalidArgument(field, f"{size} bytes; the limit is {allowed} ({option_name(limit)})")
    return size


def check_count(field: str, count: int, limits: RequestLimits, limit: str, what: str) -> None:
    allowed = getattr(limits, limit)
    if count > allowed:
        raise InvalidArgument(field, f"{count} {what}; the limit is {allowed} ({option_name(limit)})")


def _check_total(field: str, total: int, limits: RequestLimits) -> None:
    if total > limits.max_text_bytes:
        raise InvalidArgument(
            field, f"{total} bytes in all; the limit is {limits.max_text_bytes} ({option_name('max_text_bytes')})"
        )


def check_request_id(request_id: str, limits: RequestLimits) -> None:
    check_bytes("request_id", request_id, limits, "max_request_id_bytes")


def check_stop_strings(stops: Sequence[str], limits: RequestLimits, field: str = "stop") -> None:
    """At most ``max_stop_strings``, each non-empty and at most ``max_stop_bytes``."""
    check_count(field, len(stops), limits, "max_stop_strings", "stop strings")
    for i, stop in enumerate(stops):
        if not stop:
            raise InvalidArgument(f"{field}[{i}]", "must not be empty")
        check_bytes(f"{field}[{i}]", stop, limits, "max_stop_bytes")


def check_text(field: str, text: str, limits: RequestLimits) -> None:
    """A text to tokenize (Tokenize.text, Complete.prompt)."""
    check_bytes(field, text, limits, "max_text_bytes")


def check_conversation(
    messages: Sequence[tokenizer_pb2.ChatMessage], tools: Sequence[tokenizer_pb2.Tool], limits: RequestLimits
) -> None:
    """Counts and sizes of a chat (Chat, ApplyChatTemplate): messages and tools each at most
    ``max_text_bytes`` in all; tool JSON at most ``max_tool_json_bytes`` per text."""
    check_count("messages", len(messages), limits, "max_chat_messages", "messages")
    check_count("tools", len(tools), limits, "max_tools", "tools")
    total = 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        total += check_bytes(f"{where}.content", msg.content, limits, "max_text_bytes")
        total += check_bytes(f"{where}.reasoning_content", msg.reasoning_content, limits, "max_text_bytes")
        total += check_bytes(f"{where}.tool_call_id", msg.tool_call_id, limits, "max_tool_json_bytes")
        check_count(f"{where}.tool_calls", len(msg.tool_calls), limits, "max_tools", "tool calls")
        for j, call in enumerate(msg.tool_calls):
            for name in ("id", "name", "arguments_json"):
                total += check_bytes(
                    f"{where}.tool_calls[{j}].{name}", getattr(call, name), limits, "max_tool_json_bytes"
                )
        _check_total("messages", total, limits)  # inside the loop: stop at the first message past it
    total = 0
    for i, tool in enumerate(tools):
        for name in ("name", "description", "parameters_json"):
            total += check_bytes(f"tools[{i}].{name}", getattr(tool, name), limits, "max_tool_json_bytes")
        _check_total("tools", total, limits)


# A JSON string (escapes included), or an unterminated one running to the end of the text.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count),
    found without parsing: linear, no recursion. For invalid JSON the number is meaningless but finite."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def check_json_depth(field: str, text: str, limits: RequestLimits) -> None:
    depth = json_depth(text)
    if depth > limits.max_json_depth:
        raise InvalidArgument(
            field,
            f"JSON nested {depth} levels deep; the limit is {limits.max_json_depth} ({option_name('max_json_depth')})",
        )
