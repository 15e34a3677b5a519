"""Qwen3ForCausalLM: pre-norm decoder layers with GQA attention (per-head q/k RMSNorm, RoPE) and a
SwiGLU MLP, tensor-parallel throughout. Parameter names match Hugging Face checkpoints."""

from __future__ import annotations

from typing import ClassVar, cast

import torch
from torch import nn

from qwen3.attention.backend import AttentionBackend
from qwen3.config import Qwen3Config
from qwen3.distributed import tp_world_size
from qwen3.forward_batch import ForwardBatch
from qwen3.kernels import (
    fused_kv_store_enabled,
    gemv_silu_enabled,
    qk_norm_rope_supported,
    use_gemv,
    use_triton_kernels,
)
from qwen3.layers.activation import SiluAndMul
from qwen3.layers.attention import PagedAttention
from qwen3.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from qwen3.layers.layernorm import RMSNorm
from qwen3.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from qwen3.layers.rotary import RotaryEmbedding


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config, backend: AttentionBackend, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, d, config.num_attention_heads, config.num_key_value_heads, bias=config.attention_bias
        )
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size, bias=config.attention_bias)
        # Qwen3's per-head norms on q and k, applied before rotary.
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # one cos/sin table shared by every layer
        self.fused_qk_norm_rope = qk_norm_rope_supported(d)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, d**-0.5, backend)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # hidden: [T, hidden]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        new_k: torch.Tensor | None = k
        new_v: torch.Tensor | None = v
        if use_triton_kernels(q) and self.fused_qk_norm_rope and self.rotary_emb.cos_sin.dtype == torch.float32:
            # triton is imported only on this path
            from qwen3.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_store_kv

            norm_args = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.rotary_emb.cos_sin, positions)
            if fused_kv_store_enabled() and self.attn.kv_cache_attached and self.attn.k_cache.dtype == k.dtype:
                # one launch: rotated q out, rotated k and v straight into the paged cache (no store kernel after)
                q = qk_norm_rope_store_kv(q, k, v, *norm_args, self.attn.k_cache, self.attn.v_cache, batch.slot_mapping)
                new_k = new_v = None
            else:
                q, new_k = qk_norm_rope(q, k, *norm_args)
        else:
            q, new_k = self.rotary_emb(positions, self.q_norm(q), self.k_norm(k))
        out = self.attn(q, new_k, new_v, batch)  # [T, Hq, D]
        projected: torch.Tensor = self.o_proj(out.flatten(1))  # [T, hidden]
        return projected


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]
        if use_gemv(x, self.gate_up_proj.weight) and gemv_silu_enabled() and self.gate_up_proj.bias is None:
            from qwen3.kernels.gemv import gemv  # triton is imported only on this path

            act = gemv(x, self.gate_up_proj.weight, silu_and_mul=True)  # [T, intermediate / tp], one launch
        else:
            act = self.act_fn(self.gate_up_proj(x))
        out: torch.Tensor = self.down_proj(act)
        return out


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, backend: AttentionBackend, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, backend, rotary_emb)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # [max_position, head_dim] fp32: 21 MB for a 40k context, so built once, not once per layer.
        rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, backend, rotary_emb) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden, residual = self.embed_tokens(batch.input_ids), None  # [T, hidden]
        for layer in self.layers:
            hidden, residual = layer(batch.positions, hidden, residual, batch)
        out: torch.Tensor
        out, _ = self.norm(hidden, residual)
        return out


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name -> (fused parameter name, shard id): how the loader fills the fused projections
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Qwen3Config, backend: AttentionBackend) -> None:
        super().__init__()
        tp = tp_world_size()
        for field, value in (
            ("num_attention_heads", config.num_attention_heads),
            ("num_key_value_heads", config.num_key_value_heads),
            ("intermediate_size", config.intermediate_size),
        ):
            if value % tp:
                raise ValueError(f"config field '{field}' ({value}) is not divisible by tensor_parallel_size ({tp})")
        self.config = config
        self.model = Qwen3Model(config, backend)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states of every new token: [T, hidden]."""
        hidden: torch.Tensor = self.model(batch)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Logits [S, vocab] for only the rows to be sampled (``batch.logits_indices``)."""
        logits: torch.Tensor = self.lm_head(hidden[batch.logits_indices])
        return logits

    def attention_layers(self) -> list[PagedAttention]:
        return [cast(Qwen3DecoderLayer, layer).self_attn.attn for layer in self.model.layers]
