"""Rollout engines: SGLang servers or the embedded CPU engine, both driven through one HTTP client."""
from .base import (EngineConnectionError, EngineError, EngineRequestError, EngineTimeoutError, GenerateResult,
                   RolloutEngine, SamplingParams, derive_seed)
from .client import EngineClient
from .launch import EngineConfig, launch_embedded_server, launch_engine

__all__ = [
    "EngineClient", "EngineConfig", "EngineConnectionError", "EngineError", "EngineRequestError",
    "EngineTimeoutError", "GenerateResult", "RolloutEngine", "SamplingParams", "derive_seed",
    "launch_embedded_server", "launch_engine",
]
