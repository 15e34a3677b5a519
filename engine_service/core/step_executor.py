"""Run a ``StepPlan`` on the device and read its ``StepResult`` back: the model on every rank, the
sampler on rank 0, the copy of the sampled ids to the host.

``launch`` only queues work (and starts a non-blocking copy of the results to pinned memory behind a
CUDA event); ``wait`` blocks until that copy is done. With async scheduling the engine launches step
N+1 before it waits for step N, so the host builds the next step while the device computes. Neither
touches a sequence: they read the plan, and the engine hands the result to ``Scheduler.apply``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_service.core.model_runner import ModelRunner
from engine_service.core.prompt_outputs import ExtraOutputs, normalize_rows
from engine_service.core.sampler import Sampler, SamplerOutput, SamplingBatch
from engine_service.core.step_input import StepInput
from engine_service.core.step_plan import PlannedSeq, StepPlan, StepResult
from engine_service.core.structured_output import GrammarMask
from engine_service.core.tp_workers import WorkerGroup
from qwen3.forward_batch import copy_to_device


@dataclass
class LaunchedStep:
    """A step queued on the device whose sampled ids have not been read on the host yet."""

    plan: StepPlan
    host: tuple[torch.Tensor, ...]  # token ids [S], then (if asked) logprobs [S], top ids / values [S, N]
    ready: torch.cuda.Event | None  # recorded after the copies to ``host`` (None on the CPU)
    # prompt logprobs [P] then (if asked) top ids / values [P, N]; pooled states [E, hidden] (empty: not asked)
    prompt_host: tuple[torch.Tensor, ...] = ()
    pooled_host: tuple[torch.Tensor, ...] = ()
    # Set while its sampling waits for a structured-output mask (``StepExecutor.sample``): the model input,
    # the logits [S, V] of the forward pass queued on the device, and its prompt-logprob / pooled tensors.
    unsampled: tuple[StepInput, torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None = None
    sampling: SamplingBatch | None = None  # built ahead of ``sample`` by ``prepare_sampling``


def _sampler_tensors(out: SamplerOutput | None) -> list[torch.Tensor]:
    if out is None:
        return []
    tensors = [out.token_ids]
    if out.logprobs is not None:
        tensors.append(out.logprobs)
        if out.top_logprobs_ids is not None:
            tensors += [out.top_logprobs_ids, out.top_logprobs]
    return tensors


def _copy_to_host(*groups: list[torch.Tensor]) -> tuple[list[tuple[torch.Tensor, ...]], torch.cuda.Event | None]:
    """Start copying each group of device tensors to the host without waiting; the event marks their arrival."""
    tensors = [t for group in groups for t in group]
    if not tensors or tensors[0].device.type == "cpu":
        return [tuple(group) for group in groups], None
    host = [
        tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in group)
        for group in groups
    ]
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _extra_tensors(extras: ExtraOutputs | None, plan: StepPlan) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The prompt-logprob tensors and the (normalised where asked) pooled states of a step, device-side."""
    if extras is None:
        return [], []
    prompt = []
    if extras.prompt_logprobs is not None:
        prompt.append(extras.prompt_logprobs)
        if extras.prompt_top_ids is not None and extras.prompt_top_logprobs is not None:
            prompt += [extras.prompt_top_ids, extras.prompt_top_logprobs]
    pooled = []
    if extras.pooled is not None:
        flags = [bool(plan.sampling[row].seq.embed_normalize) for row in plan.embed_rows]
        pooled.append(normalize_rows(extras.pooled, flags))
    return prompt, pooled


class StepExecutor:
    """Rank 0's side of a step: drive the TP workers and the local runner, sample, copy back."""

    def __init__(
        self,
        runner: ModelRunner,
        workers: WorkerGroup | None,
        eos_token_ids: tuple[int, ...],
        vocab_size: int,
        share_sampled: bool,
    ) -> None:
        self.runner, self.workers = runner, workers
        self.eos_token_ids, self.vocab_size = eos_token_ids, vocab_size
        # With a step in flight, the next step's pending tokens are read from its sampled ids on every
        # rank: TP workers need a copy.
        self.share_sampled = share_sampled and workers is not None
        self.sampler = Sampler()

    def launch(self, plan: StepPlan, defer_sampling: bool = False) -> LaunchedStep:
        """Queue the model and the sampler for ``plan`` and start copying the sampled ids to the host.

        ``defer_sampling``: queue the model only; the caller fills the step's structured-output mask on the
        host while the device runs it (``prepare_sampling`` meanwhile), then calls ``sample``."""
        step = plan.model_input(self.share_sampled)
        if self.workers:
            self.workers.execute(step)
        logits = self.runner.execute(step)
        prompt, pooled = _extra_tensors(self.runner.extras, plan)  # taken now: the next step replaces extras
        launched = LaunchedStep(plan, (), None, unsampled=(step, logits, prompt, pooled))
        if not defer_sampling:
            self.sample(launched)
        return launched

    def prepare_sampling(self, launched: LaunchedStep) -> None:
        """Build a deferred step's sampling batch now, on the host, while its mask is filled. Reads the rows'
        sequences, so it must run before the scheduler plans another step."""
        assert launched.unsampled is not None and launched.plan.sampling, "a deferred step with sampling rows"
        launched.sampling = self._sampling_batch(launched.unsampled[1].device, launched.plan.sampling)

    def sample(self, launched: LaunchedStep, grammar: GrammarMask | None = None) -> None:
        """Queue the sampler of a launched step (with its structured-output mask) and the copy of its results."""
        assert launched.unsampled is not None, "a step is sampled once"
        (step, logits, prompt, pooled), launched.unsampled = launched.unsampled, None
        plan = launched.plan
        sampled = None
        if plan.sampling:
            batch, launched.sampling = launched.sampling, None
            if batch is None:
                batch = self._sampling_batch(logits.device, plan.sampling)
            batch.grammar = grammar
            sampled = self.sampler(logits, batch)
        self.runner.share_sampled(step, sampled.token_ids if sampled is not None else None)
        (launched.host, launched.prompt_host, launched.pooled_host), launched.ready = _copy_to_host(
            _sampler_tensors(sampled), prompt, pooled
        )

    @staticmethod
    def wait(launched: LaunchedStep) -> StepResult:
        """Block until ``launched``'s sampled ids are on the host, and return them."""
        if launched.ready is not None:
            launched.ready.synchronize()
        token_ids, logprobs, top_ids, top_vals = [t.tolist() for t in launched.host] + [None] * (4 - len(launched.host))
        prompt, prompt_top_ids, prompt_top_vals = [t.tolist() for t in launched.prompt_host] + [None] * (
            3 - len(launched.prompt_host)
        )
        embeddings = launched.pooled_host[0].tolist() if launched.pooled_host else None
        return StepResult(
            token_ids or [], logprobs, top_ids, top_vals, prompt, prompt_top_ids, prompt_top_vals, embeddings
        )

    def _sampling_batch(self, device: torch.device, rows: tuple[PlannedSeq, ...]) -> SamplingBatch:
        seqs = [e.seq for e in rows]
        # A row's input token from the step before is pending until that step is applied; a deferred sample
        # (structured output) runs after it was, so count what is still pending now: besides the token this
        # step samples, one more.
        pending = [e.pending_row is not None and e.seq.num_pending_tokens > 1 for e in rows]
        return SamplingBatch.build(
            [s.params for s in seqs],
            [s.prompt_token_ids for s in seqs],
            [s.output_token_ids for s in seqs],
            self.eos_token_ids,
            [s.seed for s in seqs],
            self.vocab_size,
            device,
            pending,
            self._pending_token_ids(rows, pending, device),
        )

    def _pending_token_ids(
        self, rows: tuple[PlannedSeq, ...], pending: list[bool], device: torch.device
    ) -> torch.Tensor | None:
        """[S] int64 on ``device``: per sampling row, the id its sequence sampled in the step in flight
        (garbage for rows without one), gathered on the device. None where no row has such a token or
        no row's penalties read earlier tokens."""
        if not any(pending) or not any(e.seq.params.reads_token_history for e in rows):
            return None
        sampled = self.runner.last_sampled  # [S_prev]: the in-flight step's ids
        assert sampled is not None, "a pending token but no sampled ids kept from the step before"
        sources = [e.pending_row if e.pending_row is not None else 0 for e in rows]
        return sampled[copy_to_device(torch.tensor(sources, dtype=torch.int64), device)]
