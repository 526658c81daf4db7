"""Prompt data: jsonl/parquet sets, prompt formatting, resumable sampling, batching, shared rollout types."""
from rfpo_megatron.data.types import GenOutput, RolloutGroup, Sample

__all__ = ["Sample", "RolloutGroup", "GenOutput"]
