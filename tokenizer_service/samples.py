"""One sample's text: the engine's token ids -> text deltas -> Chat / Complete messages.

A Chat or Complete request with ``sampling_params.n > 1`` gets n samples from one engine stream, their
messages interleaved and told apart by ``GenerateResponse.index``. Each sample has its own state here:
its incremental detokenizer and stop-string matcher (``SampleText``), and for Chat its reasoning split and
tool-call parser (``ChatSample``); a stop string ends its own sample only. Nothing here does I/O but the
final decode, which runs off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import tokenizers

from qwen3serve.engine.v1 import engine_pb2
from qwen3serve.tokenizer.v1 import tokenizer_pb2
from tokenizer_service.detokenizer import IncrementalDetokenizer
from tokenizer_service.reasoning import ReasoningSplitter
from tokenizer_service.stop_strings import StopMatch, StopStringMatcher
from tokenizer_service.tool_calls import ParsedToolCall, ToolCallParser

UNFINISHED = engine_pb2.FINISH_REASON_UNSPECIFIED


@dataclass(frozen=True)
class TextDelta:
    """New text of one sample; its last delta has a finish reason and usage."""

    text: str
    finish_reason: engine_pb2.FinishReason.ValueType = UNFINISHED
    usage: engine_pb2.Usage | None = None
    matched_stop: str = ""
    index: int = 0
    # The engine's prompt logprobs (sample 0's first message only; Complete returns them)
    prompt_logprobs: Sequence[engine_pb2.TokenLogprob] = ()

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason != UNFINISHED)


class SampleText:
    """One sample's engine messages -> text deltas: incremental detokenization (never half a UTF-8
    character), stop strings held back until they cannot match; a matched stop string ends the sample
    (``done``), and is its text's end when ``include_stop``."""

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, stops: Sequence[str], include_stop: bool, prompt_tokens: int, index: int
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self._matcher = StopStringMatcher(stops)
        self._include_stop = include_stop
        self._prompt_tokens = prompt_tokens
        self._completion_tokens = 0
        self._cached_prompt_tokens = 0
        self.index = index
        self.done = False  # its last delta was made: the engine's later messages for it are dropped

    async def push(self, response: engine_pb2.GenerateResponse) -> TextDelta | None:
        """The text ``response`` (one of this sample's engine messages) adds, if any."""
        self._completion_tokens += len(response.token_ids)
        finished = response.finish_reason != UNFINISHED
        if response.HasField("usage"):
            self._cached_prompt_tokens = response.usage.cached_prompt_tokens
        prompt_logprobs = response.prompt_logprobs  # empty but on the first message
        text = self._detokenizer.push(response.token_ids)
        if finished:  # decodes the whole output once: off the loop
            text += await asyncio.to_thread(self._detokenizer.finish)
        out = self._matcher.push(text)
        if isinstance(out, StopMatch):
            self.done = True
            usage = (
                response.usage
                if finished
                else engine_pb2.Usage(
                    prompt_tokens=self._prompt_tokens,
                    completion_tokens=self._completion_tokens,
                    cached_prompt_tokens=self._cached_prompt_tokens,
                )
            )
            text = out.text + out.stop if self._include_stop else out.text
            return TextDelta(text, engine_pb2.FINISH_REASON_STOP, usage, out.stop, self.index, prompt_logprobs)
        if finished:
            self.done = True
            text = out + self._matcher.finish()
            return TextDelta(text, response.finish_reason, response.usage, "", self.index, prompt_logprobs)
        return TextDelta(out, index=self.index, prompt_logprobs=prompt_logprobs) if out or prompt_logprobs else None


class ChatSample:
    """One sample's text deltas -> ChatResponse messages: reasoning split from the answer, tool calls
    parsed (only when the request offered tools)."""

    def __init__(self, request_id: str, starts_in_reasoning: bool, parse_tools: bool) -> None:
        self._request_id = request_id
        self._splitter = ReasoningSplitter(starts_in_reasoning=starts_in_reasoning)
        self._tool_parser = ToolCallParser() if parse_tools else None

    def push(self, delta: TextDelta) -> tokenizer_pb2.ChatResponse | None:
        """The message for ``delta``; None when it adds nothing visible yet (held back)."""
        reasoning, text = self._splitter.push(delta.text)
        if delta.finished:
            more_reasoning, more_text = self._splitter.finish()
            reasoning, text = reasoning + more_reasoning, text + more_text
        calls: list[ParsedToolCall] = []
        if self._tool_parser is not None:
            text, calls = self._tool_parser.push(text)
            if delta.finished:
                text += self._tool_parser.finish()
        tool_calls = [tokenizer_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json) for c in calls]
        if not (delta.finished or text or reasoning or tool_calls):
            return None
        response = tokenizer_pb2.ChatResponse(
            request_id=self._request_id, text=text, reasoning_text=reasoning, tool_calls=tool_calls, index=delta.index
        )
        if delta.finished:  # the sample's last message: why it ended, and its usage
            response.finish_reason = delta.finish_reason
            if delta.usage is not None:
                response.usage.CopyFrom(delta.usage)
            response.matched_stop = delta.matched_stop
        return response
