"""What a step returns beyond its sampled rows' logits: prompt logprobs and Embed requests' pooled states.

Both read the model's final-norm hidden states of positions other than (or besides) the sampled ones, so
``ModelRunner.execute`` calls :func:`extra_outputs` on a step that asks (``StepInput.needs_hidden``); steps
that do not ask never reach this module, and decode CUDA graphs stay as they are for them.

**Prompt logprobs** are the fp32 log-softmax of the raw logits (no temperature or penalties, as vLLM) over the
whole vocabulary. A long prompt's positions are run through the LM head ``rows_per_chunk`` at a time, so at
most [rows_per_chunk, vocab] fp32 logits exist at once, never [prompt_len, vocab]
(151,936 columns: 2**25 elements is ~220 rows, ~128 MiB in fp32). Every rank runs the LM head over the same
chunks (vocabulary-parallel: its all-gather pairs up across ranks); only rank 0 computes the log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine_service.core.step_input import PromptLogprobsInput, StepInput
from qwen3.forward_batch import ForwardBatch, copy_to_device
from qwen3.model import Qwen3ForCausalLM

#: Most logits elements one LM-head chunk of prompt positions may hold (rows = this // vocab, at least 1).
PROMPT_LOGPROBS_CHUNK_ELEMENTS = 2**25


@dataclass
class ExtraOutputs:
    """Device tensors of one step, on rank 0 (other ranks get None fields)."""

    prompt_logprobs: torch.Tensor | None = None  # [P] fp32: each position's target token
    prompt_top_ids: torch.Tensor | None = None  # [P, N] int64, most likely first (N > 0 only)
    prompt_top_logprobs: torch.Tensor | None = None  # [P, N] fp32
    pooled: torch.Tensor | None = None  # [E, hidden] fp32: last-token hidden state of each embed row


def rows_per_chunk(vocab_size: int) -> int:
    return max(1, PROMPT_LOGPROBS_CHUNK_ELEMENTS // vocab_size)


@torch.inference_mode()
def extra_outputs(
    model: Qwen3ForCausalLM, hidden: torch.Tensor, batch: ForwardBatch, step: StepInput, is_rank0: bool
) -> ExtraOutputs:
    """``hidden`` [T, hidden] is the step's final-norm hidden states (every new token)."""
    out = ExtraOutputs()
    if step.prompt_logprobs is not None:
        out.prompt_logprobs, out.prompt_top_ids, out.prompt_top_logprobs = _prompt_logprobs(
            model, hidden, step.prompt_logprobs, is_rank0
        )
    if step.embed_rows and is_rank0:
        rows = copy_to_device(torch.tensor(step.embed_rows, dtype=torch.int64), hidden.device)
        out.pooled = hidden[batch.logits_indices[rows]].float()  # [E, hidden]
    return out


def _prompt_logprobs(
    model: Qwen3ForCausalLM, hidden: torch.Tensor, spec: PromptLogprobsInput, is_rank0: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    device = hidden.device
    positions = copy_to_device(torch.tensor(spec.flat_positions, dtype=torch.int64), device)  # [P]
    targets = copy_to_device(torch.tensor(spec.target_ids, dtype=torch.int64), device)  # [P]
    num = len(spec.flat_positions)
    chosen = torch.empty(num, dtype=torch.float32, device=device)
    top_ids = torch.empty(num, spec.num_top, dtype=torch.int64, device=device) if spec.num_top else None
    top_vals = torch.empty(num, spec.num_top, dtype=torch.float32, device=device) if spec.num_top else None
    step = rows_per_chunk(model.config.vocab_size)
    for start in range(0, num, step):
        end = min(start + step, num)
        logits = model.lm_head(hidden[positions[start:end]])  # [c, vocab], every rank (all-gather inside)
        if not is_rank0:
            continue
        logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [c, vocab]
        chosen[start:end] = logprobs.gather(1, targets[start:end, None]).squeeze(1)
        if top_ids is not None and top_vals is not None:
            top_vals[start:end], top_ids[start:end] = logprobs.topk(spec.num_top, dim=-1)
        del logits, logprobs
    if not is_rank0:
        return None, None, None
    return chosen, top_ids, top_vals


def normalize_rows(pooled: torch.Tensor, normalize: list[bool]) -> torch.Tensor:
    """[E, hidden] fp32 with the rows whose flag is set L2-normalised (``F.normalize``: eps 1e-12)."""
    if not any(normalize):
        return pooled
    if all(normalize):
        return F.normalize(pooled, dim=-1)
    mask = copy_to_device(torch.tensor(normalize), pooled.device)[:, None]  # [E, 1]
    return torch.where(mask, F.normalize(pooled, dim=-1), pooled)
