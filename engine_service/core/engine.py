"""The incremental engine: add requests, step, receive per-request deltas, abort.

``LLMEngine.step()`` is one scheduler decision + one forward pass + sampling. It is synchronous and
single-threaded by design: the offline ``LLM`` calls it in a loop, and the gRPC service drives it
from its own process (or a thread, when embedded) through ``async_engine.py``, so it never blocks the
event loop. ``EngineInfo`` is what the service needs to know about it without touching it.
"""

from __future__ import annotations

import logging
import random

from engine_service.config import EngineConfig
from engine_service.core.block_manager import BlockManager
from engine_service.core.model_runner import ModelRunner
from engine_service.core.scheduler import Scheduler
from engine_service.core.sequence import Sequence
from engine_service.core.step_executor import LaunchedStep, StepExecutor
from engine_service.core.step_plan import StepPlan
from engine_service.core.tp_workers import WorkerGroup
from engine_service.protocol import (
    EngineDeadError,
    EngineInfo,
    EngineOverloadedError,
    EngineStats,
    FinishReason,
    RequestOutput,
    TokenLogprob,
)
from engine_service.sampling_params import SamplingParams
from qwen3.distributed import destroy_tensor_parallel

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.workers: WorkerGroup | None = None
        self.dead_reason: str | None = None
        if config.tensor_parallel_size > 1:
            self.workers = WorkerGroup(config, on_death=self._mark_dead)
        try:
            self.runner = ModelRunner(config, 0, self.workers.init_method if self.workers else None)
            if self.workers:
                self.workers.wait_ready()
                self.workers.request_capacity()
            capacity = self.runner.kv_block_capacity()
            if self.workers:
                capacity = min([capacity, *self.workers.collect_capacity()])
                self.workers.allocate_kv_cache(capacity)
            self.runner.allocate_kv_cache(capacity)
            if self.workers:
                self.workers.wait_done()
                self.workers.capture_cuda_graphs()
            self.runner.capture_cuda_graphs()
            if self.workers:
                self.workers.wait_done()
        except BaseException:
            if self.workers:
                self.workers.shutdown()
            destroy_tensor_parallel()
            raise
        mc = self.runner.model_config
        self.model_config = mc
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = mc.vocab_size
        self.eos_token_ids = tuple(mc.eos_token_ids)
        self.block_manager = BlockManager(capacity, config.kv_block_size, config.enable_prefix_caching)
        self.info = EngineInfo(
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
            dtype=str(self.runner.dtype).removeprefix("torch."),
            tensor_parallel_size=config.tensor_parallel_size,
            kv_block_size=config.kv_block_size,
            num_kv_blocks=capacity,
            attention_backend=self.runner.backend.name,
            max_waiting_requests=config.max_waiting_requests,
        )
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self._overlap = config.overlaps_steps
        self.executor = StepExecutor(self.runner, self.workers, self.eos_token_ids, self.vocab_size, self._overlap)
        self.requests: dict[str, Sequence] = {}
        self._seed_rng = random.Random(config.seed)
        self._in_flight: LaunchedStep | None = None  # the step queued on the device, not yet finished
        self.num_generated_tokens_total = 0
        log.info(
            "engine ready: %d KV blocks of %d tokens (%.1f GiB per rank), max_model_len=%d",
            capacity,
            config.kv_block_size,
            capacity * self.runner.kv_block_bytes / 2**30,
            self.max_model_len,
        )

    def _mark_dead(self, reason: str) -> None:
        self.dead_reason = reason

    # ---- requests ---------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise FieldError naming the field if this request can never be served (the service's rule:
        ``EngineInfo.validate``)."""
        self.info.validate(prompt_token_ids, params)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str = ""
    ) -> None:
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        if len(self.scheduler.waiting) >= self.config.max_waiting_requests:
            raise EngineOverloadedError(f"the waiting queue is full ({self.config.max_waiting_requests} requests)")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(62)
        seq = Sequence(request_id, list(prompt_token_ids), params, seed, cache_salt=cache_salt)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort at once (its KV blocks return to the pool now); None if unknown or already finished."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._retire(seq, FinishReason.ABORTED)
        return self._final_output(seq)

    def flush_prefix_cache(self) -> tuple[int, int]:
        """Drop every cached KV block that no live request holds (``BlockManager.flush_cache``); returns
        (blocks dropped, cached blocks kept for live requests)."""
        return self.block_manager.flush_cache()

    @property
    def num_prompt_tokens_total(self) -> int:
        """Prompt tokens computed (prefix-cache hits excluded)."""
        return self.scheduler.num_prompt_tokens_computed

    def has_unfinished_requests(self) -> bool:
        # A step still in flight when nothing is unfinished holds only finished or aborted rows: it has
        # nothing left to report, and the next step() retires it.
        return self.scheduler.num_unfinished > 0

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage,
            num_kv_blocks=bm.num_blocks,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            prefix_cache_hit_rate=bm.prefix_cache_hits / bm.prefix_cache_queries if bm.prefix_cache_queries else 0.0,
        )

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample, and report what changed. Empty when idle.

        With ``async_scheduling`` one step stays in flight: this call queues step N+1 on the device and
        only then waits for step N's sampled ids, so the host's scheduling and batch building overlap
        the device's work. Step N+1 was scheduled before step N's tokens were known: a sequence whose
        step-N token is its last allowed one is left out of it, but one that step N ends with a stop
        token computes one token too many, which is dropped. Penalties that count step N's
        tokens read them on the device (``SamplingBatch.build``'s ``pending_token_ids``).
        """
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        plan = self.scheduler.schedule()
        launched = self._launch(plan) if not plan.is_empty else None
        outputs = self._finish(self._pop_in_flight()) if self._in_flight is not None else []
        if launched is not None:
            if self._overlap:
                self._in_flight = launched
            else:
                outputs += self._finish(launched)
        return outputs

    def _pop_in_flight(self) -> LaunchedStep:
        launched, self._in_flight = self._in_flight, None
        assert launched is not None
        return launched

    def _launch(self, plan: StepPlan) -> LaunchedStep:
        """Queue ``plan`` on the device (the scheduler has already counted its tokens as computed)."""
        try:
            return self.executor.launch(plan)
        except Exception as exc:
            raise self._fail(exc) from exc

    def _fail(self, exc: BaseException) -> EngineDeadError:
        if self.workers and self.workers.death_reason:
            self.dead_reason = self.workers.death_reason
        else:
            self.dead_reason = f"engine step failed: {exc!r}"
        log.error("engine step failed")
        return EngineDeadError(self.dead_reason)

    def _finish(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's sampled ids, apply them (``Scheduler.apply``), and report what changed."""
        try:
            result = self.executor.wait(launched)
        except Exception as exc:
            raise self._fail(exc) from exc
        outputs: list[RequestOutput] = []
        for row, seq in self.scheduler.apply(launched.plan, result.token_ids):
            token = result.token_ids[row]
            self.num_generated_tokens_total += 1
            reason = self._finish_reason(seq, token, len(seq.output_token_ids))
            if reason is None:
                out = RequestOutput(seq.request_id, [token])
            else:
                self._retire(seq, reason)
                out = self._final_output(seq)  # the last delta carries the finish reason and usage
                out.new_token_ids.append(token)
            if seq.params.logprobs is not None and result.logprobs is not None:
                n = seq.params.logprobs
                top = (
                    tuple(zip(result.top_ids[row][:n], result.top_logprobs[row][:n]))
                    if (n and result.top_ids is not None)
                    else ()
                )
                out.new_logprobs = [TokenLogprob(token, result.logprobs[row], top)]
            outputs.append(out)
        return outputs

    def _retire(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish or abort ``seq``: drop its tokens in flight and return its KV blocks now."""
        self.requests.pop(seq.request_id, None)
        self.scheduler.finish(seq, reason)

    def _finish_reason(self, seq: Sequence, token: int, n: int) -> FinishReason | None:
        """Why ``seq`` ends with ``token``, its ``n``-th output token (None: it goes on)."""
        p = seq.params
        if n >= p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            return FinishReason.STOP
        if n >= p.max_tokens:  # prompt + max_tokens <= max_model_len: validated at admission
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _final_output(seq: Sequence) -> RequestOutput:
        queue_time = seq.first_scheduled_time - seq.arrival_time if seq.first_scheduled_time else None
        return RequestOutput(
            seq.request_id,
            [],
            None,
            True,
            seq.finish_reason,
            seq.num_prompt_tokens,
            len(seq.output_token_ids),
            seq.num_cached_prompt_tokens,
            queue_time,
        )

    def shutdown(self) -> None:
        """Stop the TP workers and release rank 0's GPU memory and process group. Idempotent."""
        if self.workers:
            self.workers.shutdown()
            self.workers = None
        if self.runner is not None:
            self.runner.shutdown()
            self.runner = None
