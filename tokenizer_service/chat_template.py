"""The checkpoint's tokenizer and its own chat template (rendered by transformers, never by hand).

Requests arrive as protos; :func:`messages_to_dicts` / :func:`tools_to_dicts` turn them into the
OpenAI-style dicts that Hugging Face chat templates expect (validating roles and tool JSON, with
errors naming the field), and :class:`ChatTokenizer` renders and tokenizes them.

Tokenization goes through the ``tokenizers`` backend directly: its ``encode``/``decode`` take the
tokenizer immutably, so they are safe from worker threads, where transformers' wrappers may mutate
padding/truncation state.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qwen3serve.tokenizer.v1 import tokenizer_pb2
from service_common.errors import InvalidArgument

ROLES = ("system", "user", "assistant", "tool")


def _json_object(text: str, field: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(field, f"not valid JSON ({exc.msg} at position {exc.pos})") from exc
    if not isinstance(value, dict):
        raise InvalidArgument(field, f"must be a JSON object, got {type(value).__name__}")
    return value


def messages_to_dicts(messages: Sequence[tokenizer_pb2.ChatMessage], field: str = "messages"
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
                arguments = _json_object(call.arguments_json or "{}", f"{where}.tool_calls[{j}].arguments_json")
                calls.append({**({"id": call.id} if call.id else {}), "type": "function",
                              "function": {"name": call.name, "arguments": arguments}})
            entry["tool_calls"] = calls
        if msg.tool_call_id:
            if msg.role != "tool":
                raise InvalidArgument(f"{where}.tool_call_id", "only tool messages answer a tool call")
            entry["tool_call_id"] = msg.tool_call_id
        out.append(entry)
    return out


def tools_to_dicts(tools: Sequence[tokenizer_pb2.Tool], field: str = "tools") -> list[dict[str, Any]]:
    """Proto tools -> OpenAI function-tool dicts; InvalidArgument names the bad field."""
    out = []
    for i, tool in enumerate(tools):
        if not tool.name:
            raise InvalidArgument(f"{field}[{i}].name", "must not be empty")
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        if tool.parameters_json:
            function["parameters"] = _json_object(tool.parameters_json, f"{field}[{i}].parameters_json")
        out.append({"type": "function", "function": function})
    return out


class ChatTokenizer:
    """A checkpoint's tokenizer: encode, decode, and render conversations with its chat template."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase) -> None:
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise ValueError(f"{type(hf_tokenizer).__name__} has no fast (tokenizers) backend; "
                             "the checkpoint needs a tokenizer.json")
        if not hf_tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template (tokenizer_config.json: chat_template)")
        self.hf = hf_tokenizer
        self.backend: tokenizers.Tokenizer = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ChatTokenizer:
        """Load ``tokenizer.json`` + ``tokenizer_config.json`` from a checkpoint directory."""
        path = Path(model_dir)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (is --model a Hugging Face checkpoint dir?)")
        return cls(AutoTokenizer.from_pretrained(str(path)))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False,
               field: str = "token_ids") -> str:
        """One-shot decode; ids outside the tokenizer's vocabulary are an InvalidArgument."""
        bad = next((i for i, t in enumerate(token_ids) if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"{field}[{bad}]", f"token id {token_ids[bad]} is not below the "
                                                     f"tokenizer's vocabulary size {self.vocab_size}")
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *,
               add_generation_prompt: bool, enable_thinking: bool | None = None) -> str:
        """The prompt text of a conversation. Template errors (``raise_exception`` in the template,
        e.g. a role order it does not accept) are InvalidArgument on ``messages``."""
        kwargs: dict[str, Any] = {}
        if enable_thinking is not None:  # Qwen3's template tests `enable_thinking is defined`
            kwargs["enable_thinking"] = enable_thinking
        try:
            prompt = self.hf.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt, **kwargs)
        except jinja2.TemplateError as exc:
            raise InvalidArgument("messages", f"rejected by the chat template: {exc}") from exc
        if not isinstance(prompt, str):  # tokenize=False on one conversation gives text
            raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, expected str")
        return prompt

    def apply_chat_template(self, request: tokenizer_pb2.ApplyChatTemplateRequest) -> tuple[str, list[int]]:
        """Render and tokenize (the template's special-token strings become their special ids)."""
        prompt = self.render(messages_to_dicts(request.messages), tools_to_dicts(request.tools),
                             add_generation_prompt=request.add_generation_prompt,
                             enable_thinking=request.enable_thinking if request.HasField("enable_thinking")
                             else None)
        return prompt, self.encode(prompt)
