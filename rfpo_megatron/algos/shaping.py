"""DAPO reward shaping: the soft overlong penalty.

Overlong penalty for response length |y| (L_max = max_response_len, L_cache = overlong_buffer_len):
  0 if |y| ≤ L_max − L_cache;  ((L_max − L_cache) − |y|)/L_cache if L_max − L_cache < |y| ≤ L_max;  −1 beyond,
times overlong_penalty_factor.
Dynamic sampling (keep only groups whose rewards are not all equal) is rfpo_megatron.train.generation.dynamic_sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(response_lengths: Tensor, *, max_response_len: int, overlong_buffer_len: int, overlong_penalty_factor: float = 1.0) -> Tensor:
    """Penalty [B] (float32, ≤ 0) to ADD to the rewards, from response_lengths [B] (token counts)."""
    if overlong_buffer_len <= 0 or overlong_buffer_len > max_response_len:
        raise ValueError(f"overlong_buffer_len: must be in (0, max_response_len={max_response_len}], got {overlong_buffer_len}")
    n = response_lengths.to(torch.float64)
    start = float(max_response_len - overlong_buffer_len)
    mid = (start - n) / float(overlong_buffer_len)
    pen = torch.where(n <= start, torch.zeros_like(n), torch.where(n <= max_response_len, mid, -torch.ones_like(n)))
    return (pen * overlong_penalty_factor).to(torch.float32)
