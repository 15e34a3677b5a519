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
from engine_service.core.prompt_logprob_collector import PromptLogprobCollector
from engine_service.core.scheduler import Scheduler
from engine_service.core.sequence import Sequence, SequenceStatus
from engine_service.core.step_executor import LaunchedStep, StepExecutor
from engine_service.core.step_plan import StepPlan
from engine_service.core.structured_output import MaskJob, StructuredOutputManager
from engine_service.core.tp_workers import WorkerGroup
from engine_service.pooling import PoolingConfig
from engine_service.protocol import (
    EmbeddingOutput,
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
        pooling = PoolingConfig.from_checkpoint(config.model)  # a pooling mode we cannot serve fails the load now
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
            pooling=pooling,
        )
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self._overlap = config.overlaps_steps
        self.executor = StepExecutor(self.runner, self.workers, self.eos_token_ids, self.vocab_size, self._overlap)
        self.requests: dict[str, list[Sequence]] = {}  # request id -> its samples (params.n), in index order
        self.structured = StructuredOutputManager(
            config.model, self.vocab_size, self.eos_token_ids, config.max_num_seqs, self.runner.device
        )
        self._failed: list[tuple[str, Exception]] = []  # requests that ended in an error (take_failed)
        self._seed_rng = random.Random(config.seed)
        self._in_flight: LaunchedStep | None = None  # the step queued on the device, not yet finished
        # A step whose sampler waits for its structured-output mask, filled on the worker thread meanwhile
        self._unsampled: tuple[LaunchedStep, MaskJob] | None = None
        self.num_generated_tokens_total = 0
        self._prompt_logprobs = PromptLogprobCollector()
        self._embeddings: list[EmbeddingOutput] = []  # finished Embed requests, until pop_embeddings
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
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str = "",
    ) -> None:
        """Queue a request: ``params.n`` samples of one prompt (one ``Sequence`` each, sharing the prompt's
        KV blocks: ``Scheduler.add_group``), scheduled by ``priority`` (lower first), then arrival;
        only requests with the same ``cache_salt`` share prefix-cache blocks.

        Seeds: with ``params.seed`` set, sample i samples with ``seed + i``, exactly as the same request with
        n = 1 and that seed would (vLLM's rule, ``ParentRequest._get_child_sampling_params``); without, each
        sample draws its own.

        Its ``validate`` here is a re-check, not the place requests are validated: the service validates at its
        boundary (``generate_request.generate_inputs``) and ``LLM.generate`` calls ``validate`` on every prompt
        before adding any; this guard (O(prompt length), once per request) keeps a caller that skipped both from
        putting an unservable sequence in the scheduler."""
        self._check_admission(request_id)
        self.validate(prompt_token_ids, params)  # the re-check (see the docstring)
        prompt = list(prompt_token_ids)
        samples = [
            Sequence(
                request_id,
                prompt,
                params,
                params.seed + i if params.seed is not None else self._seed_rng.getrandbits(62),
                index=i,
                priority=priority,
                cache_salt=cache_salt,
            )
            for i in range(params.n)
        ]
        self.requests[request_id] = samples
        if params.constraint is None:
            self.scheduler.add_group(samples)
        else:  # queued once its grammar is compiled (``_admit_compiled``), as vLLM's WAITING_FOR_FSM
            for seq in samples:
                seq.status = SequenceStatus.WAITING_FOR_GRAMMAR
            self.structured.submit(samples)

    def add_embed_request(self, request_id: str, prompt_token_ids: list[int], normalize: bool) -> None:
        """Queue a prefill-only request; its result comes from ``pop_embeddings`` after the step that
        computes its last prompt token. Scheduled like a prompt (chunked, prefix-cache hits kept); the one
        token its last row samples is never output, and its KV blocks are freed at once."""
        self._check_admission(request_id)
        self.info.validate_embed(prompt_token_ids)
        params = SamplingParams(temperature=0.0, max_tokens=1)  # greedy: the cheapest sampler path
        seq = Sequence(request_id, list(prompt_token_ids), params, 0, embed_normalize=bool(normalize))
        self.requests[request_id] = [seq]
        self.scheduler.add(seq)

    def _check_admission(self, request_id: str) -> None:
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if len(self.scheduler.waiting) + self.structured.num_compiling >= self.config.max_waiting_requests:
            raise EngineOverloadedError(f"the waiting queue is full ({self.config.max_waiting_requests} requests)")

    def take_failed(self) -> list[tuple[str, Exception]]:
        """Requests that ended in an error since the last call (a constraint that does not compile: a
        FieldError naming its field), each already retired; the caller tells their streams."""
        failed, self._failed = self._failed, []
        return failed

    def _admit_compiled(self, wait_s: float) -> None:
        """Queue the requests whose grammar is ready; fail those whose grammar did not compile."""
        ready, failed = self.structured.poll(wait_s)
        for samples in ready:
            self.scheduler.add_group(samples)
        for samples, exc in failed:
            for seq in samples:
                self._retire(seq, FinishReason.ERROR)
            self._failed.append((samples[0].request_id, exc))

    def pop_embeddings(self) -> list[EmbeddingOutput]:
        """Embed requests finished since the last call."""
        done, self._embeddings = self._embeddings, []
        return done

    def abort_request(self, request_id: str, index: int | None = None) -> list[RequestOutput]:
        """Abort every unfinished sample of the request (or only sample ``index``) at once: their KV blocks
        return to the pool now (blocks another sample shares stay with it). Returns their final outputs;
        empty if unknown or already finished."""
        samples = self.requests.get(request_id, ())
        ended = [s for s in samples if not s.is_finished and (index is None or s.index == index)]
        for seq in ended:
            self._retire(seq, FinishReason.ABORTED)
        return [seq.final_output() for seq in ended]

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
        return self.scheduler.num_unfinished > 0 or self.structured.num_compiling > 0

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + self.scheduler.num_parked + self.structured.num_compiling,
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
        # Nothing else to do but wait for a grammar: wait a little for it here rather than spin.
        idle = self.scheduler.num_unfinished == 0 and self._in_flight is None
        self._admit_compiled(0.05 if idle else 0.0)
        plan = self.scheduler.schedule()
        self._sample_deferred()  # before this step's forward pass, which may read its sampled ids
        # A step with constrained rows is sampled after the step in flight is applied (its tokens advance the
        # matchers): the bitmask is filled on a worker thread while the device runs this step's forward pass
        # and this thread goes on, up to the next step's launch (``_sample_deferred``).
        constrained = self.structured.num_grammars > 0 and any(
            self.structured.has_grammar(e.seq) for e in plan.sampling
        )
        launched = self._launch(plan, constrained) if not plan.is_empty else None
        deferred = launched if constrained else None
        in_flight, self._in_flight = self._in_flight, None
        outputs = self._finish(in_flight, deferred) if in_flight is not None else []
        if launched is not None:
            if deferred is not None and self._unsampled is None:  # no step was in flight to apply first
                self._defer_sampling(deferred)
            if self._overlap:
                self._in_flight = launched
            else:
                self._sample_deferred()
                outputs += self._finish(launched)
        return outputs

    def _defer_sampling(self, launched: LaunchedStep) -> None:
        """Start filling ``launched``'s mask, and build its sampling batch meanwhile."""
        job = self.structured.start_mask([e.seq for e in launched.plan.sampling])
        self._unsampled = (launched, job)
        try:
            self.executor.prepare_sampling(launched)
        except Exception as exc:
            raise self._fail(exc) from exc

    def _sample_deferred(self) -> None:
        """Queue the sampler of the step waiting for its mask, if one is (before any step is launched or read)."""
        if self._unsampled is None:
            return
        (launched, job), self._unsampled = self._unsampled, None
        try:
            self.executor.sample(launched, job.result())
        except Exception as exc:
            raise self._fail(exc) from exc

    def _launch(self, plan: StepPlan, defer_sampling: bool) -> LaunchedStep:
        """Queue ``plan`` on the device (the scheduler has already counted its tokens as computed)."""
        try:
            return self.executor.launch(plan, defer_sampling)
        except Exception as exc:
            raise self._fail(exc) from exc

    def _fail(self, exc: BaseException) -> EngineDeadError:
        if self.workers and self.workers.death_reason:
            self.dead_reason = self.workers.death_reason
        else:
            self.dead_reason = f"engine step failed: {exc!r}"
        log.error("engine step failed")
        return EngineDeadError(self.dead_reason)

    def _finish(self, launched: LaunchedStep, deferred: LaunchedStep | None = None) -> list[RequestOutput]:
        """Wait for a launched step's sampled ids, apply them (``Scheduler.apply``), and report what changed.

        ``deferred``: the step launched after it, whose sampling waits for a mask; its fill starts as soon as the
        matchers have taken this step's tokens, so it runs while this thread builds the outputs."""
        try:
            result = self.executor.wait(launched)
        except Exception as exc:
            raise self._fail(exc) from exc
        outputs: list[RequestOutput] = []
        if result.prompt_logprobs is not None:
            self._prompt_logprobs.add(launched.plan, result)
        embed_index = {row: i for i, row in enumerate(launched.plan.embed_rows)}
        applied = self.scheduler.apply(launched.plan, result.token_ids)
        broken = (  # rows whose token the grammar rejects: never after the mask; a bug if it happens
            self.structured.accept(applied, result.token_ids) if self.structured.num_grammars else set()
        )
        if deferred is not None:
            self._defer_sampling(deferred)
        for row, seq in applied:
            if seq.is_embedding:
                assert result.embeddings is not None
                self._finish_embedding(seq, result.embeddings[embed_index[row]])
                continue
            token = result.token_ids[row]
            self.num_generated_tokens_total += 1
            if row in broken:
                self._retire(seq, FinishReason.ERROR)
                self._failed.append((seq.request_id, RuntimeError(f"token {token} broke the request's grammar")))
                continue
            prompt_logprobs = None  # taken before a finish (_retire) drops them
            if seq.params.prompt_logprobs is not None and seq.index == 0 and len(seq.output_token_ids) == 1:
                prompt_logprobs = self._prompt_logprobs.take(seq.request_id)
            reason = self._finish_reason(seq, token, len(seq.output_token_ids))
            if reason is None:
                out = RequestOutput(seq.request_id, [token], index=seq.index)
            else:
                self._retire(seq, reason)
                out = seq.final_output()  # the last delta carries the finish reason and usage
                out.new_token_ids.append(token)
            if seq.params.logprobs is not None and result.logprobs is not None:
                n = seq.params.logprobs
                top = (
                    tuple(zip(result.top_ids[row][:n], result.top_logprobs[row][:n]))
                    if (n and result.top_ids is not None)
                    else ()
                )
                out.new_logprobs = [TokenLogprob(token, result.logprobs[row], top)]
            if prompt_logprobs is not None:
                out.prompt_logprobs = prompt_logprobs
            outputs.append(out)
        return outputs

    def _finish_embedding(self, seq: Sequence, embedding: list[float]) -> None:
        self._retire(seq, FinishReason.STOP)
        self._embeddings.append(
            EmbeddingOutput(seq.request_id, embedding, seq.num_prompt_tokens, seq.num_cached_prompt_tokens)
        )

    def _retire(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish or abort ``seq``: drop its tokens in flight and return its KV blocks now. The request is
        forgotten with its last sample."""
        self.structured.release(seq)
        self.scheduler.finish(seq, reason)
        if all(s.is_finished for s in self.requests.get(seq.request_id, ())):
            self.requests.pop(seq.request_id, None)
            self._prompt_logprobs.drop(seq.request_id)

    def _finish_reason(self, seq: Sequence, token: int, n: int) -> FinishReason | None:
        """Why ``seq`` ends with ``token``, its ``n``-th output token (None: it goes on)."""
        p = seq.params
        if n >= p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            return FinishReason.STOP
        if n >= p.max_tokens:  # prompt + max_tokens <= max_model_len: validated at admission
            return FinishReason.LENGTH
        return None

    def shutdown(self) -> None:
        """Stop the TP workers and release rank 0's GPU memory and process group. Idempotent."""
        self.structured.shutdown()
        if self.workers:
            self.workers.shutdown()
            self.workers = None
        if self.runner is not None:
            self.runner.shutdown()
            self.runner = None
