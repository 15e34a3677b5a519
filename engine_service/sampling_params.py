"""Per-request sampling parameters, with the defaults and meanings of vLLM's ``SamplingParams``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from service_common.validation import FieldError

# Most alternatives a request may ask logprobs for (as OpenAI's API allows).
MAX_LOGPROBS = 20

# Temperatures below this are treated as greedy: dividing logits by a near-zero temperature only
# risks overflow, and the result would be the argmax anyway.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next tokens and when it stops. Invalid values raise ``FieldError`` naming
    the field (a ``ValueError``).

    Logits are processed in the order of transformers' ``generate``: repetition penalty (prompt and
    output tokens), presence/frequency penalties (output tokens), min_tokens (EOS and stop ids banned),
    then, for sampled requests, temperature, top-k, top-p, min-p.
    """

    temperature: float = 1.0            # 0 (or below GREEDY_TEMPERATURE) = greedy
    top_p: float = 1.0                  # nucleus mass in (0, 1]; 1 disables
    top_k: int = -1                     # -1 or 0 disables
    min_p: float = 0.0                  # in [0, 1], relative to the most likely token; 0 disables
    repetition_penalty: float = 1.0     # > 0; 1 disables (transformers' multiplicative penalty)
    presence_penalty: float = 0.0       # in [-2, 2]; subtracted once from every token already generated
    frequency_penalty: float = 0.0      # in [-2, 2]; subtracted per occurrence among generated tokens
    seed: int | None = None             # None: the engine draws one at admission
    max_tokens: int = 16                # >= 1 generated tokens at most
    min_tokens: int = 0                 # EOS and stop ids are banned until this many tokens are generated
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False            # keep generating past EOS (stop_token_ids still stop)
    logprobs: int | None = None         # None: no logprobs; N: the chosen token's plus the top N (0..MAX_LOGPROBS)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FieldError(name, f"must be a finite number, got {value!r}")
        for name in ("top_k", "max_tokens", "min_tokens"):
            _require_int(name, getattr(self, name))
        if self.seed is not None:
            _require_int("seed", self.seed)
        if self.logprobs is not None:
            _require_int("logprobs", self.logprobs)

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
        if self.max_tokens < 1:
            raise FieldError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise FieldError("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise FieldError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

        if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
            raise FieldError("stop_token_ids", f"must be a sequence of token ids, got {self.stop_token_ids!r}")
        stop = tuple(self.stop_token_ids)
        bad = next((t for t in stop if isinstance(t, bool) or not isinstance(t, int) or t < 0), None)
        if bad is not None:
            raise FieldError("stop_token_ids", f"must hold non-negative ints, got {bad!r}")
        object.__setattr__(self, "stop_token_ids", stop)  # frozen: lists become tuples (hashable, immutable)

    @property
    def reads_token_history(self) -> bool:
        """Whether sampling needs the ids of earlier tokens (the penalties do)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, f"must be an int, got {value!r}")
