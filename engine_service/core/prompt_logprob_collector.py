"""Prompt logprobs gathered over a request's prefill steps, until its first output token carries them.

A prompt may be prefilled in several chunks (chunked prefill), and recomputed after a preemption; each step
returns the logprobs of the prompt positions it computed (``StepResult.prompt_logprobs``). This collector owns
the per-request lists: it appends only the next missing position, so a recomputed prompt adds nothing twice.
"""

from __future__ import annotations

from engine_service.core.step_plan import StepPlan, StepResult
from engine_service.protocol import TokenLogprob


class PromptLogprobCollector:
    """request id -> the prompt logprobs so far (entry i is prompt token i + 1: the first token has none)."""

    def __init__(self) -> None:
        self._by_request: dict[str, list[TokenLogprob]] = {}

    def add(self, plan: StepPlan, result: StepResult) -> None:
        """Append a step's prompt logprobs to each unfinished sequence's list."""
        assert result.prompt_logprobs is not None
        flat = 0
        for span in plan.prompt_logprob_spans:
            seq, n = span.seq, span.seq.params.prompt_logprobs or 0
            if not seq.is_finished:
                done = self._by_request.setdefault(seq.request_id, [])
                for k in range(span.count):
                    if span.first_token + k == len(done) + 1:
                        i = flat + k
                        top = ()
                        if n and result.prompt_top_ids is not None and result.prompt_top_logprobs is not None:
                            top = tuple(zip(result.prompt_top_ids[i][:n], result.prompt_top_logprobs[i][:n]))
                        token = seq.prompt_token_ids[span.first_token + k]
                        done.append(TokenLogprob(token, result.prompt_logprobs[i], top))
            flat += span.count

    def take(self, request_id: str) -> list[TokenLogprob]:
        """The request's prompt logprobs, forgotten here (a 1-token prompt has none)."""
        return self._by_request.pop(request_id, [])

    def drop(self, request_id: str) -> None:
        self._by_request.pop(request_id, None)
