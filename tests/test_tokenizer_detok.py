"""Incremental detokenization, stop strings and the <think> split, against the real Qwen3 tokenizer's
one-shot decode and the real Qwen3 chat template (transformers)."""

from __future__ import annotations

import random

import pytest

from tokenizer_service.chat_template import ChatTokenizer
from tokenizer_service.detokenizer import IncrementalDetokenizer
from tokenizer_service.reasoning import ReasoningSplitter, prompt_opens_thinking
from tokenizer_service.stop_strings import StopMatch, StopStringMatcher

TEXTS = [
    "Hello, world! Plain ASCII to start with.",
    "中文测试：你好，世界！日本語のテキスト、한국어 텍스트도 있습니다。",
    "Emoji 🎉🚀👍🏽 family 👩‍👩‍👧‍👦 flags 🇯🇵🇫🇷 and keycaps 1️⃣ #️⃣",
    "Ελληνικά, русский, العربية, עברית, हिन्दी, ไทย — naïve café façade Ω≈ç√∫",
    "Mixed: 数学 ∑_{i=1}^n i² = n(n+1)/2 🤔 <think>tags</think> and\ttabs\nnewlines\r\n",
]


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        out.append(ids[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_one_shot_and_never_breaks_utf8(tokenizer: ChatTokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    reference = tokenizer.hf.decode(ids)  # transformers' one-shot decode
    for chunking in ("one-by-one", "random"):
        parts = [[i] for i in ids] if chunking == "one-by-one" else _chunks(ids, random.Random(len(text)))
        detok = IncrementalDetokenizer(tokenizer.backend, skip_special_tokens=False)
        deltas = [detok.push(p) for p in parts]
        tail = detok.finish()
        assert "".join(deltas) + tail == reference
        assert not any("\ufffd" in d for d in deltas), deltas
        if chunking == "one-by-one" and any(ord(c) > 0x7FF for c in text):
            # some characters span several byte-level tokens: the hold-back was exercised
            assert any(d == "" for d in deltas), "no token was held back; the test proves nothing"


def test_incomplete_tail_and_special_tokens_match_one_shot(tokenizer: ChatTokenizer) -> None:
    emoji = tokenizer.encode("ok 🎉")
    im_end = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    ids = [*emoji[:-1], im_end]  # the emoji cut short by a special token, then the stream ends
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer.backend, skip_special_tokens=skip)
        deltas = [detok.push([i]) for i in ids]
        assert "".join(deltas) + detok.finish() == tokenizer.hf.decode(ids, skip_special_tokens=skip)
    rng = random.Random(0)
    garbage = [rng.randrange(tokenizer.vocab_size) for _ in range(300)]  # what a random model emits
    detok = IncrementalDetokenizer(tokenizer.backend)
    text = "".join(detok.push(c) for c in _chunks(garbage, rng)) + detok.finish()
    assert text == tokenizer.hf.decode(garbage, skip_special_tokens=True)


def _first_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Reference: grow the text one character at a time; the first stop string to appear ends it."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[: end - len(stop)], stop
    return text, None


@pytest.mark.parametrize(
    "stops", [["END"], ["</answer>", "\n\n"], ["aab", "ab"], ["🎉x", "界！"], ["Observation:"], ["zzz-never"]]
)
def test_stop_strings_never_leak_however_text_is_split(stops: list[str]) -> None:
    texts = [
        "The answer is 42.\n\nEND of it",
        "aaab and ab",
        "<answer>x</answer>tail",
        "你好，世界！🎉x more",
        "Thought: go\nObservation: seen",
        "no stop here at all",
    ]
    rng = random.Random(1)
    for text in texts:
        expected, expected_stop = _first_stop(text, stops)
        for _ in range(40):
            cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 8))))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            matcher = StopStringMatcher(stops)
            emitted, match = "", None
            for piece in pieces:
                out = matcher.push(piece)
                if isinstance(out, StopMatch):
                    emitted, match = emitted + out.text, out.stop
                    break
                emitted += out
                assert expected.startswith(emitted), (pieces, emitted)  # nothing emitted is ever taken back
            if match is None:
                emitted += matcher.finish()
            assert (emitted, match) == (expected, expected_stop), pieces


def test_stop_strings_over_tokens(tokenizer: ChatTokenizer) -> None:
    """A stop string spread over several tokens (and inside a multi-token character) is never emitted."""
    text = "Résultat: 你好世界 ### FIN ### ignored"
    ids = tokenizer.encode(text)
    for stop in ("### FIN", "好世", "FIN ###"):
        assert not any(stop in tokenizer.hf.decode([i]) for i in ids)  # the stop string spans tokens
        detok = IncrementalDetokenizer(tokenizer.backend)
        matcher = StopStringMatcher([stop])
        emitted = []
        for token in ids:
            out = matcher.push(detok.push([token]))
            if isinstance(out, StopMatch):
                emitted.append(out.text)
                break
            emitted.append(out)
            assert stop[:2] not in "".join(emitted)
        assert "".join(emitted) == text[: text.index(stop)]


def test_stop_matcher_rejects_empty_stop() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher(["ok", ""])


# ---- reasoning --------------------------------------------------------------------------------------
# Outputs whose split Qwen3's template agrees on (it cannot represent an unclosed block, and keeps only
# the text after the *last* </think> as the answer).
OUTPUTS = [
    "<think>\nLet me think: 你好 + 🎉.\n\nSecond paragraph.\n</think>\n\nThe answer is 42 👍",
    "<think>\n\n</think>\n\nDirect answer.",
    "\n<think>\nleading newline\n\n</think>\n\n\nthree newlines before the answer\n",
    "Just an answer, no thinking.",
]


def _split_all(splitter: ReasoningSplitter, pieces: list[str]) -> tuple[str, str]:
    reasoning, answer = [], []
    for piece in pieces:
        r, a = splitter.push(piece)
        reasoning.append(r)
        answer.append(a)
    r, a = splitter.finish()
    return "".join(reasoning) + r, "".join(answer) + a


def _render(tokenizer: ChatTokenizer, assistant: dict) -> str:
    return tokenizer.hf.apply_chat_template([{"role": "user", "content": "q"}, assistant], tokenize=False)


@pytest.mark.parametrize("output", OUTPUTS)
def test_reasoning_split_round_trips_through_the_qwen3_template(tokenizer: ChatTokenizer, output: str) -> None:
    """Qwen3's own template, given our (reasoning, answer) as reasoning_content + content, renders
    exactly what it renders for the raw output (from which it extracts the reasoning itself)."""
    rng = random.Random(2)
    reference = _render(tokenizer, {"role": "assistant", "content": output})
    splits = [[output], list(output)] + [
        [output[:a], output[a:b], output[b:]] for a, b in (sorted(rng.sample(range(len(output)), 2)) for _ in range(30))
    ]
    for pieces in splits:
        reasoning, answer = _split_all(ReasoningSplitter(), pieces)
        ours = _render(tokenizer, {"role": "assistant", "content": answer, "reasoning_content": reasoning})
        assert ours == reference, pieces


def test_reasoning_split_details() -> None:
    assert _split_all(ReasoningSplitter(), list(OUTPUTS[0])) == (
        "Let me think: 你好 + 🎉.\n\nSecond paragraph.",
        "The answer is 42 👍",
    )
    # unfinished reasoning stays reasoning; a non-leading <think> is answer text
    assert _split_all(ReasoningSplitter(), ["<think>\nunfinished", " reasoning\n"]) == ("unfinished reasoning", "")
    assert _split_all(ReasoningSplitter(), ["<think>a</think>b <think>c</think>"]) == ("a", "b <think>c</think>")
    assert _split_all(ReasoningSplitter(), list("  <thin")) == ("", "  <thin")
    assert _split_all(ReasoningSplitter(), ["Hi <think>x</think>"]) == ("", "Hi <think>x</think>")
    # a prompt that already opened <think>: the output starts as reasoning
    assert _split_all(ReasoningSplitter(starts_in_reasoning=True), list("\nwhy\n</think>\n\nbecause")) == (
        "why",
        "because",
    )


def test_prompt_opens_thinking_on_real_prompts(tokenizer: ChatTokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    on = tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    off = tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert "</think>" in off  # the template closed an empty block: the answer comes directly
    assert not prompt_opens_thinking(on) and not prompt_opens_thinking(off)
    assert prompt_opens_thinking(on + "<think>\n")
