"""Incremental detokenization of a generated token stream.

Qwen3's byte-level BPE splits many characters (CJK, emoji, accented letters) across tokens, so
decoding token by token would emit halves of UTF-8 sequences as U+FFFD. ``tokenizers``' own
``DecodeStream`` holds a token back until its bytes complete a character; :meth:`finish` then
decodes the whole output once and emits whatever the stream still held (an incomplete sequence at
the very end becomes U+FFFD exactly as in one-shot decoding). The contract, tested:

    "".join(d.push(ids) for ids in chunks) + d.finish() == tokenizer.decode(all_ids)
"""

from __future__ import annotations

from collections.abc import Iterable

import tokenizers
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Turns one request's token ids, as they arrive, into text deltas that are never broken UTF-8."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._token_ids: list[int] = []
        self._emitted_chars = 0
        self._finished = False

    def push(self, token_ids: Iterable[int]) -> str:
        """The text completed by these new tokens (possibly ""; never ends in a partial character)."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        pieces = []
        for token_id in token_ids:
            self._token_ids.append(token_id)
            piece = self._stream.step(self._tokenizer, token_id)
            if piece:  # None: the token's bytes do not complete a character yet (or it was skipped)
                pieces.append(piece)
        text = "".join(pieces)
        self._emitted_chars += len(text)
        return text

    def finish(self) -> str:
        """The rest of the text: what one-shot decoding of all tokens has beyond what was emitted."""
        if self._finished:
            return ""
        self._finished = True
        # The batch form releases the GIL (a long output takes milliseconds; callers run this in a thread).
        full = self._tokenizer.decode_batch([self._token_ids], skip_special_tokens=self._skip_special_tokens)[0]
        if len(full) < self._emitted_chars:
            # Cannot happen for byte-level BPE; a tokenizer whose decoder rewrites earlier text (e.g.
            # whitespace clean-up) would break the contract, so fail loudly rather than garble text.
            raise RuntimeError(
                f"incremental decode emitted {self._emitted_chars} chars, one-shot decode "
                f"of the same {len(self._token_ids)} tokens has {len(full)}"
            )
        return full[self._emitted_chars :]
