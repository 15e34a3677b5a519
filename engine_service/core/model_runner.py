"""One rank's model: loads its weight shard, owns its KV cache, runs forward steps.

Rank 0 lives in the engine process; ranks 1..N-1 run the same class in worker processes
(``tp_workers.py``). Every rank executes the same ``StepInput`` in lockstep, since the layers'
all-reduces pair up across ranks. Only rank 0's logits are sampled.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch

from engine_service.config import EngineConfig
from engine_service.core.cuda_graph import CUDAGraphRunner
from engine_service.core.prompt_outputs import ExtraOutputs, extra_outputs
from engine_service.core.step_input import StepInput
from qwen3.attention import create_backend
from qwen3.config import Qwen3Config
from qwen3.distributed import broadcast_from_rank0, destroy_tensor_parallel, init_tensor_parallel
from qwen3.forward_batch import BlockTableRows, ForwardBatch, copy_to_device
from qwen3.loader import load_checkpoint
from qwen3.model import Qwen3ForCausalLM

log = logging.getLogger(__name__)

# CPU default pool when num_kv_blocks is not given: room for this many full-length sequences.
_CPU_DEFAULT_FULL_SEQUENCES = 4


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, init_method: str | None = None) -> None:
        self.config = config
        self.rank = rank
        world = config.tensor_parallel_size
        device = config.torch_device
        if device.type == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        self.device = device
        if world > 1:
            if init_method is None:
                raise ValueError("init_method is required when tensor_parallel_size > 1")
            init_tensor_parallel(rank, world, init_method, device)
        self.model_config = Qwen3Config.from_pretrained(config.model)
        self.dtype = config.resolve_dtype(self.model_config.torch_dtype)
        mpe = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > mpe:
            raise ValueError(
                f"max_model_len ({config.max_model_len}) exceeds the model's max_position_embeddings ({mpe})"
            )
        self.max_model_len = config.max_model_len or mpe
        self.block_size = config.kv_block_size
        self.backend = create_backend(config.attention_backend, device, self.dtype)
        started = time.monotonic()
        with _default_dtype(self.dtype), torch.device(device):
            self.model = Qwen3ForCausalLM(self.model_config, self.backend)
        load_checkpoint(self.model, config.model)
        self.model.eval()
        if rank == 0:
            log.info(
                "model loaded: %s, dtype=%s, device=%s, tp=%d, backend=%s in %.1fs",
                config.model,
                str(self.dtype).removeprefix("torch."),
                device,
                world,
                self.backend.name,
                time.monotonic() - started,
            )
        self.num_kv_blocks = 0
        self.graph_runner: CUDAGraphRunner | None = None
        self._table_rows = BlockTableRows()  # the block-table array of the last step, rows kept between steps
        self.last_sampled: torch.Tensor | None = None  # [S] int64: the previous step's sampled ids
        self.extras: ExtraOutputs | None = None  # the last step's prompt logprobs / pooled states, if it asked

    # ---- KV cache ---------------------------------------------------------------------------
    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block on this rank, over all layers, K and V."""
        layer = self.model.attention_layers()[0]
        per_token = layer.num_kv_heads * layer.head_dim * torch.tensor([], dtype=self.dtype).element_size()
        return 2 * len(self.model.attention_layers()) * self.block_size * per_token

    def kv_block_capacity(self) -> int:
        """How many KV blocks this rank can hold.

        CPU: the configured count (default: a few full-length sequences). CUDA: run a warm-up step of
        ``max_num_batched_tokens`` tokens, measure the peak activation memory, and give the KV cache
        what ``gpu_memory_utilization`` leaves.
        """
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type != "cuda":
            return _CPU_DEFAULT_FULL_SEQUENCES * -(-self.max_model_len // self.block_size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        warmup_kv_bytes = self._warmup()
        free, total = torch.cuda.mem_get_info()
        used = total - free
        peak, current = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        # The peak includes the warm-up's own (released) KV cache, which the real cache replaces.
        activations = max(0, peak - current - warmup_kv_bytes)
        available = total * self.config.gpu_memory_utilization - used - activations
        blocks = int(available // self.kv_block_bytes)
        if blocks < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (used {used / 2**30:.1f} GiB, peak activations "
                f"{activations / 2**30:.1f} GiB); raise gpu_memory_utilization or lower "
                "max_num_batched_tokens"
            )
        return blocks

    @torch.inference_mode()
    def _warmup(self) -> int:
        """One worst-case prefill step through a throwaway KV cache, to measure peak activations.
        Returns the bytes of that KV cache (allocated during the measurement, released after it)."""
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len * self.config.max_num_seqs)
        seq_len = min(self.max_model_len, tokens)
        num_seqs = max(1, tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        self.allocate_kv_cache(num_seqs * blocks_per_seq)
        step = StepInput(
            token_ids=[[0] * seq_len for _ in range(num_seqs)],
            context_lens=[0] * num_seqs,
            block_tables=[list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(num_seqs)],
            sample_rows=[True] * num_seqs,
        )
        self.execute(step)
        torch.cuda.synchronize()
        kv_bytes = self.kv_cache.numel() * self.kv_cache.element_size()
        self.release_kv_cache()
        return kv_bytes

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV pool and attach each layer's view: [num_blocks, block_size, Hkv_local, D]."""
        layers = self.model.attention_layers()
        shape = (2, len(layers), num_blocks, self.block_size, layers[0].num_kv_heads, layers[0].head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self.num_kv_blocks = num_blocks

    def release_kv_cache(self) -> None:
        for layer in self.model.attention_layers():
            layer.k_cache = layer.v_cache = torch.empty(0)
        self.kv_cache = None
        self.num_kv_blocks = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def shutdown(self) -> None:
        """Free the KV cache and CUDA graphs and leave the TP group (if any)."""
        self.graph_runner = None
        self.release_kv_cache()
        if self.config.tensor_parallel_size > 1:
            destroy_tensor_parallel()

    # ---- CUDA graphs ------------------------------------------------------------------------
    def capture_cuda_graphs(self) -> None:
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        if not self.backend.supports_cuda_graphs:
            log.warning("attention backend %r cannot run inside CUDA graphs; decode runs eagerly", self.backend.name)
            return
        max_blocks = -(-self.max_model_len // self.block_size)
        self.graph_runner = CUDAGraphRunner(
            self.model, self.config.max_num_seqs, max_blocks, self.block_size, self.device
        )
        self.graph_runner.capture()

    # ---- steps ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """Run one step; returns the logits [num sampled rows, vocab] (every rank computes them).

        ``step.pending`` names input tokens still on the device, sampled by the step before: they are
        copied from ``last_sampled`` into their input slots here, behind that step's sampler in stream
        order, so the host never waits for them.
        """
        batch = ForwardBatch.build(
            step.input_token_ids(),
            step.context_lens,
            step.block_tables,
            self.block_size,
            self.device,
            step.sample_rows,
            self._table_rows,
        )
        if step.pending is not None:
            if self.last_sampled is None:
                raise RuntimeError("a step names pending tokens but no sampled ids were shared before it")
            rows = [step.pending.flat_positions, step.pending.source_rows]
            index = copy_to_device(torch.tensor(rows), self.device)  # [2, P]
            batch.input_ids[index[0]] = self.last_sampled[index[1]]
        self.extras = None
        if self.graph_runner is not None and not step.needs_hidden and self.graph_runner.can_run(batch):
            return self.graph_runner.run(batch)
        hidden = self.model(batch)
        if step.needs_hidden:
            self.extras = extra_outputs(self.model, hidden, batch, step, self.rank == 0)
        return self.model.compute_logits(hidden, batch)

    def share_sampled(self, step: StepInput, sampled: torch.Tensor | None) -> None:
        """Keep a step's sampled ids [S] int64 for the next step's pending tokens.

        Rank 0 passes the ids it sampled; with ``step.share_sampled`` they are broadcast and the other
        ranks (``sampled`` None) receive them. Every rank calls this after ``execute`` of the same step.
        """
        if step.share_sampled:
            if sampled is None:
                sampled = torch.empty(step.num_sampled, dtype=torch.int64, device=self.device)
            broadcast_from_rank0(sampled)
        self.last_sampled = sampled
