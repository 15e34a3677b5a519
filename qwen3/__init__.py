"""Qwen3 for serving: config, tensor-parallel layers, paged-KV attention backends and a safetensors loader."""

from qwen3.config import ConfigError, Qwen3Config
from qwen3.forward_batch import ForwardBatch
from qwen3.loader import CheckpointError, load_checkpoint
from qwen3.model import Qwen3ForCausalLM

__all__ = ["CheckpointError", "ConfigError", "ForwardBatch", "Qwen3Config", "Qwen3ForCausalLM", "load_checkpoint"]
