"""Chat's ``response_format`` and ``tool_choice`` as an engine constraint (``SamplingParams.constraint``).

- ``response_format`` json_object / json_schema: the answer is JSON (the engine starts the constraint after
  ``</think>`` when thinking is on), sent as the engine's ``json_object`` / ``json_schema``.
- ``tool_choice`` "required" (any offered tool) or a named function: the answer is one Qwen3 tool call,
  ``<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>``, where ARGS matches that tool's parameters
  schema. The grammar is composed with xgrammar (each tool's ``{"name", "arguments"}`` object from its JSON
  schema, between the tags; one such call per tool, joined as alternatives) and sent as the engine's EBNF
  ``grammar``. "none": the tools are not shown to the model; "auto" (or unset): it may call one or answer.

xgrammar is imported only when a call is forced (it loads torch, which this service otherwise loads with
transformers anyway); the composition runs in a worker thread (the caller's ``asyncio.to_thread``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from qwen3serve.engine.v1 import engine_pb2
from qwen3serve.tokenizer.v1 import tokenizer_pb2
from service_common.errors import InvalidArgument
from service_common.validation import grammar_compiler_message
from tokenizer_service.config import RequestLimits
from tokenizer_service.conversation import parse_json_object
from tokenizer_service.tool_calls import TOOL_CALL_END, TOOL_CALL_START

TOOL_CHOICE_MODES = ("auto", "none", "required")
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def chat_generation(
    request: tokenizer_pb2.ChatRequest, limits: RequestLimits
) -> tuple[engine_pb2.SamplingParams, Sequence[tokenizer_pb2.Tool]]:
    """The sampling parameters to send (the request's, with the constraint its response_format or tool_choice
    asks for) and the tools to render into the prompt. InvalidArgument names the field at fault."""
    sampling = request.sampling_params
    fmt = request.response_format.type if request.HasField("response_format") else ""
    if fmt not in ("", *RESPONSE_FORMAT_TYPES):
        raise InvalidArgument("response_format.type", f"must be one of {', '.join(RESPONSE_FORMAT_TYPES)}; got {fmt!r}")
    mode, forced = _tool_choice(request)
    if fmt not in ("", "text") and forced is not None:
        raise InvalidArgument("response_format", "cannot be combined with a forced tool call (tool_choice)")
    if (fmt not in ("", "text") or forced is not None) and sampling.WhichOneof("constraint") is not None:
        raise InvalidArgument(
            "sampling_params." + str(sampling.WhichOneof("constraint")),
            "cannot be combined with response_format or a forced tool call (tool_choice)",
        )
    tools = [] if mode == "none" else request.tools
    if fmt in ("", "text") and forced is None:
        return sampling, tools
    out = engine_pb2.SamplingParams()
    out.CopyFrom(sampling)
    if fmt == "json_object":
        out.json_object = True
    elif fmt == "json_schema":
        schema = request.response_format.json_schema
        if not schema:
            raise InvalidArgument("response_format.json_schema", "must hold the schema when type is json_schema")
        parse_json_object(schema, "response_format.json_schema", limits)
        out.json_schema = schema
    elif forced is not None:
        out.grammar = tool_call_grammar(request.tools, forced, limits)
    return out, tools


def chat_fields(request: tokenizer_pb2.ChatRequest) -> dict[str, str]:
    """The engine's request fields that Chat fills from its own, by the Chat field's name: the engine's
    INVALID_ARGUMENT about one of them (a schema that does not compile) names what the caller sent."""
    fields = {"prompt_token_ids": "messages"}
    if request.HasField("response_format") and request.response_format.type == "json_schema":
        fields["sampling_params.json_schema"] = "response_format.json_schema"
    return fields


def _tool_choice(request: tokenizer_pb2.ChatRequest) -> tuple[str, list[int] | None]:
    """(mode, the indices of the tools a forced call may use, or None when no call is forced)."""
    choice = request.tool_choice
    which = choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if which == "function_name":
        named = [i for i, tool in enumerate(request.tools) if tool.name == choice.function_name]
        if not named:
            raise InvalidArgument(
                "tool_choice.function_name", f"names no tool of the request: {choice.function_name!r}"
            )
        return "required", named[:1]
    mode = choice.mode if which == "mode" else "auto"
    if mode not in TOOL_CHOICE_MODES:
        raise InvalidArgument("tool_choice.mode", f"must be one of {', '.join(TOOL_CHOICE_MODES)}; got {mode!r}")
    if mode == "required":
        if not request.tools:
            raise InvalidArgument("tool_choice.mode", "is 'required' but the request offers no tools")
        return mode, list(range(len(request.tools)))
    return mode, None


def tool_call_grammar(tools: Sequence[tokenizer_pb2.Tool], indices: list[int], limits: RequestLimits) -> str:
    """EBNF (xgrammar's syntax) of one Qwen3 tool call to one of ``tools[indices]``, its arguments valid
    against that tool's parameters schema (any JSON object when it has none)."""
    import xgrammar as xgr

    calls = []
    for i in indices:
        tool = tools[i]
        field = f"tools[{i}].parameters_json"
        parameters: dict[str, Any] = (
            parse_json_object(tool.parameters_json, field, limits) if tool.parameters_json else {"type": "object"}
        )
        call_schema = {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": parameters},
            "required": ["name", "arguments"],
        }
        try:
            body = xgr.Grammar.from_json_schema(json.dumps(call_schema), any_whitespace=False)
        except RuntimeError as exc:  # xgrammar's complaint about the schema
            raise InvalidArgument(
                field, f"is not a schema the tool call can follow: {grammar_compiler_message(exc)}"
            ) from None
        calls.append(
            xgr.Grammar.concat(
                xgr.Grammar.from_ebnf(f"root ::= {json.dumps(TOOL_CALL_START + chr(10))}"),
                body,
                xgr.Grammar.from_ebnf(f"root ::= {json.dumps(chr(10) + TOOL_CALL_END)}"),
            )
        )
    return str(calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls))
