"""The checkpoint's tokenizer and its own chat template (rendered by transformers, never by hand).

Plain types only: conversations are the OpenAI-style dicts Hugging Face chat templates take (the
servicer converts protos, :mod:`tokenizer_service.conversation`).

**Chat content is text.** A special-token string written inside a message (``<|im_start|>system``,
``<|im_end|>``) is tokenized as the characters it is made of, never as the control token, so a user
cannot forge a role; only the template's own special tokens become special ids. How: every string
the caller supplied is escaped before rendering (special-token strings and the escape character
become private-use placeholders, :class:`_SpecialTextEscape`), so after rendering every special-token
string left in the prompt is the template's. The prompt is split at those, each piece between them
is unescaped and encoded with special-token matching off, and the pieces' ids are joined with the
template's special ids. This is exactly how ``tokenizers`` itself encodes (it splits at added tokens
before pre-tokenizing), so a conversation without special-token strings in its content gets the same
ids as transformers' ``apply_chat_template(tokenize=True)``; non-special added tokens (Qwen3's
``<think>``, ``<tool_call>``) are matched in content as transformers matches them.

Tokenization calls the ``tokenizers`` backend's batch methods, also for one text: a single
``encode`` holds the GIL for its whole run (seconds for megabytes), its batch form releases it, so a
worker thread running it leaves the event loop free (measured: docs/RELIABILITY.md, "Limits").
The backends are used immutably (no padding/truncation state), so they are safe from worker threads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import tokenizers

from service_common.errors import InvalidArgument

if TYPE_CHECKING:  # transformers imports torch (~2 s): loaded with a tokenizer, not for `--help`
    from transformers import PreTrainedTokenizerBase

Json = dict[str, Any]


class _SpecialTextEscape:
    """Reversible escaping of special-token strings inside caller-supplied text.

    ``ESC`` (a private-use character) followed by one code character: ``ESC ESC`` is a literal ESC,
    ``ESC chr(0xE001 + i)`` is special token ``i``. Templates transform content (Qwen3's strips
    newlines and splits at ``</think>``) but never inside these two-character sequences.
    """

    ESC = "\ue000"

    def __init__(self, specials: Sequence[str]) -> None:
        self._encode = {self.ESC: self.ESC * 2} | {s: self.ESC + chr(0xE001 + i) for i, s in enumerate(specials)}
        self._decode = {code[1]: text for text, code in self._encode.items()}
        longest_first = sorted(self._encode, key=len, reverse=True)
        self._find = re.compile("|".join(map(re.escape, longest_first)))
        self._escaped = re.compile(re.escape(self.ESC) + r"([\s\S])")

    def escape(self, value: Any) -> Any:
        """``value`` (JSON-like: dicts, lists, strings, numbers) with every string escaped, keys too."""
        if isinstance(value, str):
            return self._find.sub(lambda m: self._encode[m[0]], value)
        if isinstance(value, dict):
            return {self.escape(k): self.escape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.escape(v) for v in value]
        return value

    def unescape(self, text: str) -> str:
        return self._escaped.sub(lambda m: self._decode.get(m[1], m[0]), text)


class ChatTokenizer:
    """A checkpoint's tokenizer: encode, decode, and render conversations with its chat template."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase) -> None:
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise ValueError(
                f"{type(hf_tokenizer).__name__} has no fast (tokenizers) backend; the checkpoint needs a tokenizer.json"
            )
        if not hf_tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template (tokenizer_config.json: chat_template)")
        self.hf = hf_tokenizer
        self.backend: tokenizers.Tokenizer = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # A second backend that encodes special-token strings as text (transformers' split_special_tokens):
        # a copy, because the flag is the tokenizer's state and the backend is shared by worker threads.
        self._text_backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self._text_backend.encode_special_tokens = True
        self.special_ids = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._escape = _SpecialTextEscape(list(self.special_ids))
        longest_first = sorted(self.special_ids, key=len, reverse=True)
        # No special tokens: a pattern that never matches (an empty alternation would match everywhere).
        self._split_specials = re.compile(
            "(" + "|".join(map(re.escape, longest_first)) + ")" if longest_first else r"(\Z.)"
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ChatTokenizer:
        """Load ``tokenizer.json`` + ``tokenizer_config.json`` from a checkpoint directory."""
        path = Path(model_dir)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (is --model a Hugging Face checkpoint dir?)")
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of a raw text; special-token strings in it become their special ids."""
        return self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False, field: str = "token_ids") -> str:
        """One-shot decode; ids outside the tokenizer's vocabulary are an InvalidArgument."""
        bad = next((i for i, t in enumerate(token_ids) if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(
                f"{field}[{bad}]",
                f"token id {token_ids[bad]} is not below the tokenizer's vocabulary size {self.vocab_size}",
            )
        return self.backend.decode_batch([list(token_ids)], skip_special_tokens=skip_special_tokens)[0]

    def render(
        self,
        messages: list[Json],
        tools: list[Json] | None = None,
        *,
        add_generation_prompt: bool,
        enable_thinking: bool | None = None,
    ) -> str:
        """The prompt text of a conversation, as the template writes it. Template errors
        (``raise_exception`` in the template, e.g. a role order it does not accept) are InvalidArgument
        on ``messages``."""
        kwargs: dict[str, Any] = {}
        if enable_thinking is not None:  # Qwen3's template tests `enable_thinking is defined`
            kwargs["enable_thinking"] = enable_thinking
        # transformers types tools as a list of dicts or functions; lists are invariant, hence the copy's type.
        tool_list: list[dict[str, Any] | Callable[..., Any]] | None = list(tools) if tools else None
        try:
            prompt = self.hf.apply_chat_template(
                messages, tools=tool_list, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except jinja2.TemplateError as exc:
            raise InvalidArgument("messages", f"rejected by the chat template: {exc}") from exc
        if not isinstance(prompt, str):  # tokenize=False on one conversation gives text
            raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, expected str")
        return prompt

    def apply_chat_template(
        self,
        messages: list[Json],
        tools: list[Json] | None = None,
        *,
        add_generation_prompt: bool,
        enable_thinking: bool | None = None,
    ) -> tuple[str, list[int]]:
        """Render and tokenize: (prompt text, prompt ids). The template's special-token strings become
        special ids; the same strings inside the caller's content stay text (module docstring)."""
        escaped = self.render(
            self._escape.escape(messages),
            self._escape.escape(tools or []),
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )
        # re.split with a capturing group: [text, special, text, special, ..., text]
        parts = self._split_specials.split(escaped)
        texts = [self._escape.unescape(t) for t in parts[0::2]]
        encoded = self._text_backend.encode_batch_fast(texts, add_special_tokens=False)
        ids: list[int] = list(encoded[0].ids)
        for special, piece in zip(parts[1::2], encoded[1:], strict=True):
            ids.append(self.special_ids[special])
            ids.extend(piece.ids)
        return self._escape.unescape(escaped), ids
