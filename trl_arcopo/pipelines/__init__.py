"""Diffusers pipelines of causal (chunk-wise autoregressive) video generators."""

from .causal_wan import CausalGenerationState, CausalWanPipeline, CausalWanPipelineOutput, ChunkTrajectory
from .sampler import few_step_schedule

__all__ = [
    "CausalGenerationState",
    "CausalWanPipeline",
    "CausalWanPipelineOutput",
    "ChunkTrajectory",
    "few_step_schedule",
]
