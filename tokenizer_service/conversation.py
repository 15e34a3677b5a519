"""Proto conversations -> the plain OpenAI-style dicts that chat templates take.

The servicer's side of the chat template: :mod:`tokenizer_service.chat_template` sees only plain
types. Roles, role-specific fields and tool JSON are validated here, with errors naming the field;
sizes and counts were checked before (:mod:`tokenizer_service.limits`). Tool JSON is checked for
nesting depth before it is parsed and for lone surrogates (``"\\ud800"``) after: Python's ``json``
accepts both, and both would otherwise fail later, inside the template or the tokenizer, as INTERNAL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from qwen3serve.tokenizer.v1 import tokenizer_pb2
from service_common.errors import InvalidArgument
from tokenizer_service.config import RequestLimits
from tokenizer_service.limits import check_json_depth

ROLES = ("system", "user", "assistant", "tool")

# A \uD800-\uDFFF escape: the only way a JSON text can carry a surrogate (the text itself is valid UTF-8).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_json_object(text: str, field: str, limits: RequestLimits) -> dict[str, Any]:
    """A JSON object from tool JSON text; InvalidArgument (naming ``field``) for anything else."""
    check_json_depth(field, text, limits)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(field, f"not valid JSON ({exc.msg} at position {exc.pos})") from exc
    except RecursionError as exc:  # not reached within the depth limit; kept so no JSON can be INTERNAL
        raise InvalidArgument(field, "JSON nested too deeply") from exc
    if not isinstance(value, dict):
        raise InvalidArgument(field, f"must be a JSON object, got {type(value).__name__}")
    if _SURROGATE_ESCAPE.search(text):  # pairs are fine (json joins them); a lone one cannot be encoded
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgument(
                field,
                f"a \\u{ord(exc.object[exc.start]):04x} escape that is not part of a "
                "surrogate pair is not a Unicode character",
            ) from exc
    return value


def messages_to_dicts(
    messages: Sequence[tokenizer_pb2.ChatMessage], limits: RequestLimits, field: str = "messages"
) -> list[dict[str, Any]]:
    """Proto messages -> chat-template dicts (OpenAI layout); InvalidArgument names the bad field."""
    if not messages:
        raise InvalidArgument(field, "at least one message is required")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"{field}[{i}]"
        if msg.role not in ROLES:
            raise InvalidArgument(f"{where}.role", f"must be one of {', '.join(ROLES)}; got {msg.role!r}")
        entry: dict[str, Any] = {"role": msg.role, "content": msg.content}
        if msg.HasField("reasoning_content"):
            if msg.role != "assistant":
                raise InvalidArgument(f"{where}.reasoning_content", "only assistant messages have reasoning")
            entry["reasoning_content"] = msg.reasoning_content
        if msg.tool_calls:
            if msg.role != "assistant":
                raise InvalidArgument(f"{where}.tool_calls", "only assistant messages make tool calls")
            calls = []
            for j, call in enumerate(msg.tool_calls):
                if not call.name:
                    raise InvalidArgument(f"{where}.tool_calls[{j}].name", "must not be empty")
                arguments = parse_json_object(
                    call.arguments_json or "{}", f"{where}.tool_calls[{j}].arguments_json", limits
                )
                calls.append(
                    {
                        **({"id": call.id} if call.id else {}),
                        "type": "function",
                        "function": {"name": call.name, "arguments": arguments},
                    }
                )
            entry["tool_calls"] = calls
        if msg.tool_call_id:
            if msg.role != "tool":
                raise InvalidArgument(f"{where}.tool_call_id", "only tool messages answer a tool call")
            entry["tool_call_id"] = msg.tool_call_id
        out.append(entry)
    return out


def tools_to_dicts(
    tools: Sequence[tokenizer_pb2.Tool], limits: RequestLimits, field: str = "tools"
) -> list[dict[str, Any]]:
    """Proto tools -> OpenAI function-tool dicts; InvalidArgument names the bad field."""
    out = []
    for i, tool in enumerate(tools):
        if not tool.name:
            raise InvalidArgument(f"{field}[{i}].name", "must not be empty")
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        if tool.parameters_json:
            function["parameters"] = parse_json_object(tool.parameters_json, f"{field}[{i}].parameters_json", limits)
        out.append({"type": "function", "function": function})
    return out
