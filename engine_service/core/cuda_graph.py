"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with static input buffers.

A decode step of a small model is dominated by kernel-launch overhead (hundreds of small kernels);
replaying a captured graph removes it. Batches are padded up to the next bucket: padding rows write
no KV (slot -1), attend to one position of block 0, and their logits are discarded.
"""

from __future__ import annotations

import logging

import torch

from qwen3.forward_batch import ForwardBatch
from qwen3.model import Qwen3ForCausalLM

log = logging.getLogger(__name__)


def batch_size_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16 up to ``max_batch_size`` (always included)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    buckets += list(range(16, max_batch_size, 16))
    buckets.append(max_batch_size)
    return sorted(set(buckets))


class CUDAGraphRunner:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        max_batch_size: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.buckets = batch_size_buckets(max_batch_size)
        n = max_batch_size
        self._input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self._positions = torch.zeros(n, dtype=torch.int64, device=device)
        self._slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self._seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self._block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self._logits_indices = torch.arange(n, dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._pool = None

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self._input_ids[:bs],
            positions=self._positions[:bs],
            slot_mapping=self._slot_mapping[:bs],
            query_start_loc=self._query_start_loc[: bs + 1],
            seq_lens=self._seq_lens[:bs],
            block_tables=self._block_tables[:bs],
            logits_indices=self._logits_indices[:bs],
            # a static upper bound (tokens), baked into the graph: backends must not size work by it in decode
            max_query_len=1,
            max_seq_len=self.max_blocks_per_seq * self.block_size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        for bs in reversed(self.buckets):
            batch = self._static_batch(bs)
            for _ in range(2):  # warm-up outside capture: lazy inits, autotuning, JIT
                self.model.compute_logits(self.model(batch), batch)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._logits[bs] = self.model.compute_logits(self.model(batch), batch)
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[bs] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.is_decode
            and batch.num_seqs <= self.max_batch_size
            and batch.block_tables.shape[1] <= self.max_blocks_per_seq
            and batch.logits_indices.shape[0] == batch.num_seqs
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a decode batch, through the smallest bucket that holds it."""
        n = batch.num_seqs
        bs = next(b for b in self.buckets if b >= n)
        self._input_ids[:n].copy_(batch.input_ids)
        self._positions[:n].copy_(batch.positions)
        self._slot_mapping[:n].copy_(batch.slot_mapping)
        self._slot_mapping[n:bs].fill_(-1)
        self._seq_lens[:n].copy_(batch.seq_lens)
        self._seq_lens[n:bs].fill_(1)
        width = batch.block_tables.shape[1]
        self._block_tables[:n, :width].copy_(batch.block_tables)
        self._graphs[bs].replay()
        return self._logits[bs][:n]
