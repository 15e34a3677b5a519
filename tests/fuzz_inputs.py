"""Seeded hostile inputs for both services: requests of the right shape with random field values, and byte
mutations of their serialized form (``tests/fuzzer.py`` sends them).

Valid-shaped requests carry what a hostile or careless client sends: empty, huge (just past each limit, so
the check is hit without paying for the work), negative, NaN and infinite numbers, unicode of every width,
special-token strings, lone-surrogate escapes and deep nesting in tool JSON, many and long stop strings, ids
past the vocabulary, reused request ids. Mutations work on the wire bytes: bit flips, random bytes,
insertions, deletions, truncation, duplicated chunks, extra fields of any wire type, string fields holding
invalid UTF-8 (a raw lone surrogate ``ED A0 80``, ``FF``, an overlong ``C0 80``) and length prefixes larger
than the body. Whether protobuf can parse a mutated body is decided here, with the same library the servers
use, so the fuzzer knows which answer to expect.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

from qwen3serve.engine.v1 import engine_pb2
from qwen3serve.tokenizer.v1 import tokenizer_pb2

# Pieces random text is made of: every UTF-8 width, combining marks, zero-width and control characters,
# the Qwen3 special-token and tag strings, a replacement character and a lone-surrogate *escape* (as text).
TEXT_PIECES = (
    "",
    "hello",
    " world",
    " ",
    "\n\n",
    "\t",
    "你好世界",
    "🙂👍🏽",
    "👨‍👩‍👧",
    "مرحبا",
    "e\u0301",
    "\u200b",
    "\u202e",
    "\x00",
    "\x1b[31m",
    "\x7f",
    "<|im_start|>system\n",
    "<|im_end|>",
    "<|endoftext|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    '{"name": "f", "arguments": {}}',
    "\ufffd",
    "\U0010ffff",
    "\\ud800",
    "%s%n",
    "'; DROP TABLE x; --",
    "a" * 100,
)
ROLES = ("system", "user", "assistant", "tool", "", "robot", "USER", "assistant\n", "用户")
# Bytes that make a proto3 string field unparseable: a raw lone surrogate, bytes never valid in UTF-8, an
# overlong NUL, a truncated 3-byte sequence.
# Ids every part knows: below the tokenizer's regular vocabulary (the model's is larger), and <|im_end|>.
TEXT_VOCAB, IM_END = 151643, 151645
INVALID_UTF8 = (b"\xed\xa0\x80", b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xe4\xbd", b"a\x80b")


@dataclass(frozen=True)
class Sizes:
    """The servers' limits, so that "huge" values land just past them (and a few far past)."""

    max_text_bytes: int = 1 << 20
    max_tool_json_bytes: int = 64 << 10
    max_json_depth: int = 64
    max_chat_messages: int = 1024
    max_tools: int = 128
    max_stop_strings: int = 16
    max_stop_bytes: int = 256
    max_request_id_bytes: int = 256
    max_stop_token_ids: int = 256
    max_model_len: int = 256
    vocab_size: int = 151936
    engine_max_message_bytes: int = 8 << 20
    # Most text of a request meant to pass the limits: keeps tokenizing cheap (1 MiB costs ~1 s of CPU).
    max_accepted_text_bytes: int = 16 << 10


class Inputs:
    """Random field values and requests, all drawn from one ``random.Random`` (same seed, same inputs).

    Half the requests are *wild*: each of their fields is hostile with probability 0.3 (past a limit, NaN,
    negative, empty, broken JSON, ...); the other half have only valid values, so that enough requests pass
    validation and exercise generation, detokenization, stop strings and tool-call parsing behind it."""

    def __init__(self, rng: random.Random, sizes: Sizes = Sizes()) -> None:
        self.rng = rng
        self.sizes = sizes
        self.wild = False

    def _start(self) -> None:
        """A new request: wild or not."""
        self.wild = self.rng.random() < 0.5

    def _hostile(self) -> bool:
        return self.wild and self.rng.random() < 0.3

    # ---- values ------------------------------------------------------------------------------
    def text(self) -> str:
        r, s = self.rng, self.sizes
        if self._hostile():
            kind = r.randrange(4)
            if kind == 0:
                return "x" * (s.max_text_bytes + r.randint(1, 3))  # one byte past the limit: rejected before any work
            if kind == 1:
                return r.choice(TEXT_PIECES[1:]) * r.randint(1, s.max_accepted_text_bytes // 100)
            return ""
        if r.random() < 0.7:
            return "".join(r.choice(TEXT_PIECES) for _ in range(r.randint(1, 12)))
        # random code points of every plane, surrogates excluded (a str cannot be sent with them)
        return "".join(
            chr(r.choice((r.randint(1, 0x7F), r.randint(0x80, 0xD7FF), r.randint(0xE000, 0x10FFFF))))
            for _ in range(r.randint(1, 64))
        )

    def small_text(self, limit: int) -> str:
        """Text for a size-limited field: within ``limit`` bytes, or (hostile) one past it."""
        if self._hostile():
            return "y" * (limit + 1)
        text = "".join(self.rng.choice(TEXT_PIECES) for _ in range(self.rng.randint(0, 4)))
        return text.encode()[:limit].decode(errors="ignore")

    def request_id(self) -> str:
        r = self.rng
        if self._hostile():
            if r.random() < 0.8:
                return "r" * (self.sizes.max_request_id_bytes + 1)
            return "r" * r.choice((100_000, 6 << 20))  # far past it (6 MiB: the multi-megabyte id)
        return r.choice(
            (
                "",
                "",
                f"fz-{r.randint(0, 7)}",
                f"fz-{r.randint(0, 7)}",  # a small pool: live duplicates
                "ид-" + "🙂" * r.randint(1, 63),
                "r" * self.sizes.max_request_id_bytes,
            )
        )

    def number(self, low: float, high: float) -> float:
        """A float field's value: in [low, high], or (hostile) anything a float can hold."""
        if self._hostile():
            return self.rng.choice(
                (
                    -0.0,
                    -1.0,
                    -2.5,
                    1e-45,
                    3.4e38,
                    -3.4e38,
                    float("nan"),
                    float("inf"),
                    float("-inf"),
                    low - 1e-3,
                    high + 1e-3,
                )
            )
        return self.rng.choice((low, high, self.rng.uniform(low, high)))

    def token_id(self) -> int:
        r, vocab = self.rng, self.sizes.vocab_size
        if self._hostile():
            return r.choice((vocab, vocab + r.randrange(1 << 20), 2**32 - 1))
        return r.choice((r.randrange(TEXT_VOCAB), r.randrange(1000), 0, IM_END))

    def token_ids(self) -> list[int]:
        r, s = self.rng, self.sizes
        if self._hostile():
            kind = r.random()
            if kind < 0.3:
                return []
            if kind < 0.7:
                return [r.randrange(s.vocab_size)] * (s.max_model_len + r.randint(-2, 1))  # around the length limit
            if kind < 0.95:
                return [r.randrange(1000)] * r.choice((10_000, 10_000, 1_000_000))
            return [1 << 21] * 2_200_000  # 4 bytes per id: past the engine's 8 MiB message limit
        return [self.token_id() for _ in range(r.randint(1, 24))]

    def json_text(self) -> str:
        """Tool JSON: a valid object, or (hostile) deep, lone surrogates, broken, not an object, oversized."""
        r, s = self.rng, self.sizes
        if not self._hostile():
            return json.dumps(
                {self.small_text(16): self._json_value(r.randint(0, 4)) for _ in range(r.randint(0, 3))},
                ensure_ascii=r.random() < 0.5,
            )
        kind = r.randrange(5)
        if kind == 0:
            depth = r.choice((s.max_json_depth - 1, s.max_json_depth + 1, 10_000))
            return "[" * depth + "]" * depth if r.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
        if kind == 1:
            return r.choice(('{"x": "\\ud800"}', '{"\\udfff": 1}', '{"x": "\\ud800\\ud800"}', '"\\udbff"'))
        if kind == 2:
            return r.choice(
                (
                    "{",
                    "}",
                    "{'a': 1}",
                    '{"a": NaN}',
                    '{"a": 1e999}',
                    '{"a": -Infinity}',
                    "nul",
                    '{"a":1,"a":2}',
                    "\x00",
                    "[1,]",
                    '{"a": "\x01"}',
                )
            )
        if kind == 3:
            return r.choice(("[]", "1", '"s"', "null", "true", ""))
        return '{"p": "' + "z" * (s.max_tool_json_bytes + 1) + '"}'

    def _json_value(self, depth: int) -> object:
        r = self.rng
        if depth == 0 or r.random() < 0.3:
            return r.choice((1, -1, 0.5, 10**30, True, None, self.small_text(40)))
        if r.random() < 0.5:
            return [self._json_value(depth - 1) for _ in range(r.randint(0, 3))]
        return {self.small_text(16): self._json_value(depth - 1) for _ in range(r.randint(0, 3))}

    def stops(self) -> list[str]:
        r, s = self.rng, self.sizes
        pieces = ("\n", "the", "。", "🙂", "</think>", "<|im_end|>", "!", "a", " ")
        if self._hostile():
            count = r.choice((s.max_stop_strings + 1, 100_000))
            return (
                [r.choice(("", "s" * (s.max_stop_bytes + 1), *pieces))] * count
                if r.random() < 0.5
                else [r.choice(("", "s" * (s.max_stop_bytes + 1)))]
            )
        return [
            r.choice(pieces) if r.random() < 0.7 else self.small_text(s.max_stop_bytes) or "z"
            for _ in range(r.choice((0, 0, 1, 2, 3, s.max_stop_strings)))
        ]

    def sampling(self, logprobs: bool = False) -> engine_pb2.SamplingParams:
        """Random sampling fields. ``max_tokens`` stays small unless hostile (the fuzzer then bounds the call
        with a cancel or a deadline); ``logprobs`` only where asked for (or hostile)."""
        r, s = self.rng, self.sizes
        msg = engine_pb2.SamplingParams()
        for name, low, high in (
            ("temperature", 0.0, 2.0),
            ("top_p", 1e-3, 1.0),
            ("min_p", 0.0, 1.0),
            ("repetition_penalty", 0.5, 2.0),
            ("presence_penalty", -2.0, 2.0),
            ("frequency_penalty", -2.0, 2.0),
        ):
            if r.random() < 0.3:
                setattr(msg, name, self.number(low, high))
        if r.random() < 0.2:
            msg.top_k = r.choice((-2, 2**31 - 1, -(2**31))) if self._hostile() else r.choice((-1, 0, 1, 50))
        if r.random() < 0.2:
            msg.seed = r.choice((0, -1, 2**63 - 1, -(2**63), r.randrange(1 << 32)))
        hostile = self._hostile()
        if hostile or r.random() < 0.95:
            msg.max_tokens = r.choice((0, 2**32 - 1, s.max_model_len)) if hostile else r.randint(1, 8)
        if r.random() < 0.15:
            msg.min_tokens = r.choice((9, 2**32 - 1)) if self._hostile() else r.randint(0, 1)
        if (logprobs and r.random() < 0.3) or self._hostile():
            msg.logprobs = r.choice((21, 2**32 - 1)) if self._hostile() else r.randint(0, 20)
        if r.random() < 0.2:
            if self._hostile():
                msg.stop_token_ids.extend([7] * r.choice((s.max_stop_token_ids + 1, 1_000_000)))
            msg.stop_token_ids.extend(self.token_id() for _ in range(r.randint(1, 5)))
        msg.ignore_eos = r.random() < 0.5
        return msg

    # ---- requests --------------------------------------------------------------------------------
    def generate(self) -> engine_pb2.GenerateRequest:
        self._start()
        request = engine_pb2.GenerateRequest(request_id=self.request_id(), prompt_token_ids=self.token_ids())
        if self.rng.random() < 0.9:
            request.sampling_params.CopyFrom(self.sampling(logprobs=True))
        return request

    def abort(self) -> engine_pb2.AbortRequest:
        self._start()
        return engine_pb2.AbortRequest(request_id=self.request_id())

    def tokenize(self) -> tokenizer_pb2.TokenizeRequest:
        self._start()
        return tokenizer_pb2.TokenizeRequest(text=self.text(), add_special_tokens=self.rng.random() < 0.5)

    def detokenize(self) -> tokenizer_pb2.DetokenizeRequest:
        self._start()
        return tokenizer_pb2.DetokenizeRequest(token_ids=self.token_ids(), skip_special_tokens=self.rng.random() < 0.5)

    def message(self) -> tokenizer_pb2.ChatMessage:
        """A chat message; fields only its role may have (reasoning, tool calls, tool_call_id) only when hostile."""
        r, s = self.rng, self.sizes
        role = r.choice(ROLES if self._hostile() else ROLES[:4])
        msg = tokenizer_pb2.ChatMessage(role=role, content=self.text() if r.random() < 0.3 else self.small_text(200))
        if (role == "assistant" or self._hostile()) and r.random() < 0.3:
            msg.reasoning_content = self.small_text(200)
        calls = s.max_tools + 1 if self._hostile() else r.choice((0, 0, 1, 2)) if role == "assistant" else 0
        if calls > 2:  # past the count limit: one cheap call, repeated
            msg.tool_calls.extend([tokenizer_pb2.ToolCall(name="f", arguments_json="{}")] * calls)
        for _ in range(calls if calls <= 2 else 0):
            msg.tool_calls.add(id=self.small_text(40), name=self.small_text(40) or "f", arguments_json=self.json_text())
        if (role == "tool" or self._hostile()) and r.random() < 0.5:
            msg.tool_call_id = self.small_text(40)
        return msg

    def messages(self) -> list[tokenizer_pb2.ChatMessage]:
        count = (
            self.rng.choice((0, self.sizes.max_chat_messages + 1))
            if self._hostile()
            else self.rng.choice((1, 1, 2, 3, 5))
        )
        if count > 8:  # one small message, repeated: cheap to build, still past the count limit
            return [tokenizer_pb2.ChatMessage(role="user", content=self.small_text(20))] * count
        return [self.message() for _ in range(count)]

    def tools(self) -> list[tokenizer_pb2.Tool]:
        return [
            tokenizer_pb2.Tool(
                name=self.small_text(40) or "f", description=self.small_text(200), parameters_json=self.json_text()
            )
            for _ in range(self.sizes.max_tools + 1 if self._hostile() else self.rng.choice((0, 0, 1, 2, 3)))
        ]

    def apply_chat_template(self) -> tokenizer_pb2.ApplyChatTemplateRequest:
        self._start()
        request = tokenizer_pb2.ApplyChatTemplateRequest(
            messages=self.messages(), tools=self.tools(), add_generation_prompt=self.rng.random() < 0.5
        )
        if self.rng.random() < 0.5:
            request.enable_thinking = self.rng.random() < 0.5
        return request

    def chat(self) -> tokenizer_pb2.ChatRequest:
        self._start()
        request = tokenizer_pb2.ChatRequest(
            request_id=self.request_id(), messages=self.messages(), tools=self.tools(), stop=self.stops()
        )
        if self.rng.random() < 0.5:
            request.enable_thinking = self.rng.random() < 0.5
        if self.rng.random() < 0.9:
            request.sampling_params.CopyFrom(self.sampling())
        return request

    def complete(self) -> tokenizer_pb2.CompleteRequest:
        self._start()
        request = tokenizer_pb2.CompleteRequest(request_id=self.request_id(), prompt=self.text(), stop=self.stops())
        if self.rng.random() < 0.9:
            request.sampling_params.CopyFrom(self.sampling())
        return request

    # ---- bytes -----------------------------------------------------------------------------------
    def mutate(self, body: bytes) -> bytes:
        """One to four random edits of a serialized request."""
        r = self.rng
        data = bytearray(body)
        for _ in range(r.randint(1, 2)):
            op = r.choices(range(8), weights=(4, 2, 1, 1, 1, 1, 1, 1))[0]
            at = r.randint(0, len(data))
            if op == 0 and data:  # flip one bit
                i = r.randrange(len(data))
                data[i] ^= 1 << r.randrange(8)
            elif op == 1 and data:  # overwrite one byte
                data[r.randrange(len(data))] = r.randrange(256)
            elif op == 2:
                data[at:at] = r.randbytes(r.randint(1, 8))
            elif op == 3 and data:
                del data[at : at + r.randint(1, 8)]
            elif op == 4:
                del data[r.randint(0, len(data)) :]  # truncate
            elif op == 5 and data:
                start = r.randrange(len(data))
                data[at:at] = data[start : start + r.randint(1, 32)]
            elif op == 6:
                data += self.raw_field()
            else:  # a string field (field 1 is a string in most requests) holding invalid UTF-8
                bad = r.choice(INVALID_UTF8)
                data += bytes([0x0A, len(bad)]) + bad
        return bytes(data)

    def raw_field(self) -> bytes:
        """One field of a random number and wire type, hand-encoded: any of them may be malformed."""
        r = self.rng
        number = r.choice((1, 2, 3, 4, 5, 6, 7, 11, 15, 16, 1000, 2**29 - 1, 0))
        wire = r.choice((0, 1, 2, 5, 3, 4, 6, 7))  # 3/4 (groups) and 6/7 do not exist in proto3 data
        tag = _varint(number << 3 | wire)
        if wire == 0:
            return tag + _varint(r.choice((0, 1, 2**32 - 1, 2**64 - 1)))
        if wire == 1:
            return tag + r.randbytes(8)
        if wire == 5:
            return tag + r.randbytes(4)
        if wire == 2:
            payload = r.choice((b"", r.randbytes(r.randint(1, 16)), r.choice(INVALID_UTF8)))
            length = len(payload) + r.choice((0, 0, 0, 1, 1000, 2**31))  # sometimes past the end
            return tag + _varint(length) + payload
        return tag

    def random_bytes(self) -> bytes:
        r = self.rng
        return r.choice(
            (
                b"",
                r.randbytes(r.randint(1, 64)),
                b"\x00" * r.randint(1, 16),
                b"\xff" * 11,
                r.randbytes(r.randint(1000, 70_000)),
            )
        )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def parses(body: bytes, message_type: type[Message]) -> bool:
    """Whether protobuf (the servers' library) parses ``body`` as ``message_type``."""
    try:
        message_type.FromString(body)
    except DecodeError:
        return False
    return True
