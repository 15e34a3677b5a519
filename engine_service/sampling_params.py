"""Per-request sampling parameters, with the defaults and meanings of vLLM's ``SamplingParams``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from engine_service.constraints import OutputConstraint
from service_common.validation import FieldError

# Most alternatives a request may ask logprobs for (as OpenAI's API allows).
MAX_LOGPROBS = 20
# Most alternatives per prompt token (prompt_logprobs): the same limit.
MAX_PROMPT_LOGPROBS = MAX_LOGPROBS

# OpenAI's range for a logit_bias value: -100 in effect bans a token, +100 in effect forces it.
MAX_LOGIT_BIAS = 100.0

# Temperatures below this are treated as greedy: dividing logits by a near-zero temperature only
# risks overflow, and the result would be the argmax anyway.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next tokens and when it stops. Invalid values raise ``FieldError`` naming
    the field (a ``ValueError``).

    Logits are processed in this order: logit_bias (added to the model's logits, as OpenAI describes
    it), then as transformers' ``generate``: repetition penalty (prompt and output tokens),
    presence/frequency penalties (output tokens); then the bans (allowed_token_ids, bad_words,
    min_tokens' EOS and stop ids); then, for sampled requests, temperature, top-k, top-p, min-p.
    """

    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 disables
    top_k: int = -1  # -1 or 0 disables
    min_p: float = 0.0  # in [0, 1], relative to the most likely token; 0 disables
    repetition_penalty: float = 1.0  # > 0; 1 disables (transformers' multiplicative penalty)
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted once from every token already generated
    frequency_penalty: float = 0.0  # in [-2, 2]; subtracted per occurrence among generated tokens
    seed: int | None = None  # None: the engine draws one at admission
    max_tokens: int = 16  # >= 1 generated tokens at most
    min_tokens: int = 0  # EOS and stop ids are banned until this many tokens are generated
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # keep generating past EOS (stop_token_ids still stop)
    logprobs: int | None = None  # None: no logprobs; N: the chosen token's plus the top N (0..MAX_LOGPROBS)
    # token id -> bias in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS] added to its logit; a mapping becomes sorted pairs
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None  # None: every token; else only these (not empty)
    # Token-id sequences never completed: a sequence's last id is banned while the output ends with the
    # ids before it (vLLM's bad_words, on ids; a one-id sequence bans that id outright).
    bad_words: tuple[tuple[int, ...], ...] = ()
    # None: no prompt logprobs; N: each prompt token's (from the second on) plus the top N (0..MAX_PROMPT_LOGPROBS),
    # from the raw logits. Such a request skips prefix-cache hits for its prompt (every position is computed).
    prompt_logprobs: int | None = None
    # Independent samples of the prompt (>= 1; the services cap it, --max-n). The prompt's KV blocks are
    # shared; with a seed, sample i samples with seed + i (vLLM's rule).
    n: int = 1
    # Structured output: the text must match this (JSON schema, regex, grammar, JSON object, choice); the
    # engine core compiles it (engine_service.core.structured_output) and masks the tokens that cannot follow.
    constraint: OutputConstraint | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FieldError(name, f"must be a finite number, got {value!r}")
        for name in ("top_k", "max_tokens", "min_tokens", "n"):
            _require_int(name, getattr(self, name))
        if self.seed is not None:
            _require_int("seed", self.seed)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name))

        if self.temperature < 0:
            raise FieldError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FieldError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise FieldError("top_k", f"must be -1 or 0 (disabled) or a positive count, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise FieldError("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise FieldError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            raise FieldError("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise FieldError("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.n < 1:
            raise FieldError("n", f"must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise FieldError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise FieldError("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise FieldError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_PROMPT_LOGPROBS:
            raise FieldError("prompt_logprobs", f"must be in [0, {MAX_PROMPT_LOGPROBS}], got {self.prompt_logprobs}")

        # frozen: lists become tuples (hashable, immutable)
        object.__setattr__(self, "stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.allowed_token_ids is not None:
            allowed = _token_ids("allowed_token_ids", self.allowed_token_ids)
            if not allowed:
                raise FieldError("allowed_token_ids", "must not be empty (leave it unset to allow every token)")
            object.__setattr__(self, "allowed_token_ids", allowed)
        _require_sequence("bad_words", self.bad_words, "token-id sequences")
        words = tuple(_token_ids(f"bad_words[{i}]", word) for i, word in enumerate(self.bad_words))
        empty = next((i for i, word in enumerate(words) if not word), None)
        if empty is not None:
            raise FieldError(f"bad_words[{empty}]", "must hold at least one token id")
        object.__setattr__(self, "bad_words", words)
        if self.constraint is not None:
            if not isinstance(self.constraint, OutputConstraint):
                raise FieldError("constraint", f"must be an OutputConstraint, got {self.constraint!r}")
            # A complete constraint allows only EOS: generating past it (or banning it) leaves no token to pick.
            if self.ignore_eos:
                raise FieldError("ignore_eos", "cannot be combined with a structured-output constraint")
            if self.min_tokens:
                raise FieldError("min_tokens", "cannot be combined with a structured-output constraint")

    @cached_property  # read for every row of every step (StepExecutor); the params never change
    def reads_token_history(self) -> bool:
        """Whether sampling needs the ids of earlier tokens (the penalties do, and bad_words of more than
        one id, which compare the output's tail)."""
        return (
            self.repetition_penalty != 1.0
            or bool(self.presence_penalty)
            or bool(self.frequency_penalty)
            or any(len(word) > 1 for word in self.bad_words)
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @cached_property  # read for every row of every step (SamplingBatch.build); the params never change
    def sampler_row(self) -> tuple[float, ...]:
        """The per-row numbers the sampler gathers each step, in ``SAMPLER_ROW`` order. A greedy row carries
        neutral warpers (temperature 1, top_p 1, min_p 0, top_k 0), so its argmax is kept; top_k 0 = off."""
        greedy = self.is_greedy
        return (
            1.0 if greedy else self.temperature,
            1.0 if greedy else self.top_p,
            0.0 if greedy else self.min_p,
            self.repetition_penalty,
            self.presence_penalty,
            self.frequency_penalty,
            float(greedy),
            0.0 if greedy else float(max(self.top_k, 0)),
            float(bool(self.logit_bias or self.bad_words or self.allowed_token_ids is not None)),
            -1.0 if self.logprobs is None else float(self.logprobs),
            float(self.min_tokens),
        )


#: Column names of ``SamplingParams.sampler_row``.
SAMPLER_ROW = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "greedy",
    "top_k",
    "token_controls",
    "logprobs",
    "min_tokens",
)


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, f"must be an int, got {value!r}")


def _require_sequence(name: str, value: object, what: str) -> None:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise FieldError(name, f"must be a sequence of {what}, got {value!r}")


def _token_ids(name: str, value: object) -> tuple[int, ...]:
    """``value`` as a tuple of non-negative int ids; FieldError naming ``name`` otherwise."""
    _require_sequence(name, value, "token ids")
    ids: tuple[int, ...] = tuple(value)  # type: ignore[arg-type]  # checked on the next lines
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or t < 0), None)
    if bad is not None:
        raise FieldError(name, f"must hold non-negative ints, got {bad!r}")
    return ids


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """A mapping (or pairs) of token id -> bias as sorted (id, bias) pairs; the error names the id
    (``logit_bias[5]``)."""
    if not isinstance(value, Mapping):
        _require_sequence("logit_bias", value, "(token id, bias) pairs")
    pairs = list(value.items()) if isinstance(value, Mapping) else [tuple(p) for p in value]  # type: ignore
    if any(len(p) != 2 for p in pairs):
        raise FieldError("logit_bias", "must map token ids to biases")
    ids = [t for t, _ in pairs]
    if len(set(ids)) != len(ids):
        raise FieldError("logit_bias", "names a token id twice")
    for token, bias in pairs:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise FieldError("logit_bias", f"keys must be non-negative token ids, got {token!r}")
        if (
            isinstance(bias, bool)
            or not isinstance(bias, (int, float))
            or not math.isfinite(bias)
            or abs(bias) > MAX_LOGIT_BIAS
        ):
            raise FieldError(
                f"logit_bias[{token}]", f"must be a number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}"
            )
    return tuple(sorted((t, float(b)) for t, b in pairs))
