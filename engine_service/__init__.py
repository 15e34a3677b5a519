"""The GPU engine service: continuous-batching scheduler, paged KV cache with prefix caching, sampler,
CUDA-graph model runner, tensor-parallel workers, and the streaming gRPC Generate service."""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["LLM", "EngineConfig", "LLMEngine", "SamplingParams"]

if TYPE_CHECKING:
    from engine_service.config import EngineConfig
    from engine_service.core.engine import LLMEngine
    from engine_service.core.llm import LLM
    from engine_service.sampling_params import SamplingParams


def __getattr__(name: str) -> type:  # lazy: `python -m engine_service --help` should not import torch first
    if name == "LLM":
        from engine_service.core.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine_service.core.engine import LLMEngine

        return LLMEngine
    if name == "EngineConfig":
        from engine_service.config import EngineConfig

        return EngineConfig
    if name == "SamplingParams":
        from engine_service.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
