"""Vocabulary-parallel token embedding and LM head.

The vocabulary is split into ``tp`` contiguous row ranges (the last one padded when ``tp`` does not
divide it). Embedding: a rank looks up only ids in its range, writes zeros for the others, and the
partial rows are all-reduced. LM head: each rank computes logits for its range and the ranges are
gathered (padding columns dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_world_size
from qwen3.layers.linear import linear
from qwen3.layers.weights import CheckpointTensor, copy_checked


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_world_size()
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // self.tp_size)  # ceil
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]  # read by the checkpoint loader

    def weight_loader(self, param: nn.Parameter, source: CheckpointTensor, shard_id: object = None) -> None:
        expected = (self.num_embeddings, param.shape[1])
        if tuple(source.shape) != expected:
            raise ValueError(f"shape mismatch: checkpoint has {tuple(source.shape)}, the model expects {expected}")
        rows = self.vocab_end - self.vocab_start
        param.data.zero_()  # padding rows of the last shard stay zero
        copy_checked(param.data[:rows], source.narrow(0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, hidden]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start, torch.zeros_like(input_ids))
        rows = F.embedding(local_ids, self.weight) * in_shard.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(rows)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> logits over the full vocabulary. Callers pass only the rows to be sampled."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [S, hidden] -> logits [S, vocab]
        logits = linear(hidden, self.weight)  # [S, rows_per_rank]; the GEMV for S <= 8 on CUDA
        if self.tp_size > 1:
            logits = all_gather_last_dim(logits)[:, : self.num_embeddings]
        return logits
