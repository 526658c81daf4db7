"""DAPO reward shaping and sampling: soft overlong penalty and the dynamic-sampling group filter.

Overlong penalty for response length |y| (L_max = max_response_len, L_cache = overlong_buffer_len):
  0 if |y| ≤ L_max − L_cache;  ((L_max − L_cache) − |y|)/L_cache if L_max − L_cache < |y| ≤ L_max;  −1 beyond,
times overlong_penalty_factor. Dynamic sampling keeps only groups whose rewards are not all equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rfpo_megatron.algos.stats import group_stats


def overlong_penalty(response_lengths: Tensor, *, max_response_len: int, overlong_buffer_len: int, overlong_penalty_factor: float = 1.0) -> Tensor:
    """Penalty [B] (float32, ≤ 0) to ADD to the rewards, from response_lengths [B] (token counts)."""
    if overlong_buffer_len <= 0 or overlong_buffer_len > max_response_len:
        raise ValueError(f"overlong_buffer_len: must be in (0, max_response_len={max_response_len}], got {overlong_buffer_len}")
    n = response_lengths.to(torch.float64)
    start = float(max_response_len - overlong_buffer_len)
    mid = (start - n) / float(overlong_buffer_len)
    pen = torch.where(n <= start, torch.zeros_like(n), torch.where(n <= max_response_len, mid, -torch.ones_like(n)))
    return (pen * overlong_penalty_factor).to(torch.float32)


@dataclass
class FilterResult:
    """keep [B] bool; counts of groups kept/dropped in this batch."""

    keep: Tensor
    num_groups: int
    num_kept_groups: int
    num_dropped_groups: int


def dynamic_sampling_filter(rewards: Tensor, group_ids: Tensor) -> FilterResult:
    """Keep the samples of groups whose rewards are not all equal (G = 1 groups are always dropped)."""
    st = group_stats(rewards, group_ids)
    keep = ~st["all_equal"]
    uniq = torch.unique(group_ids)
    kept = torch.unique(group_ids[keep]) if bool(keep.any()) else uniq[:0]
    return FilterResult(keep=keep, num_groups=int(uniq.numel()), num_kept_groups=int(kept.numel()), num_dropped_groups=int(uniq.numel() - kept.numel()))


def dynamic_sampling_continue(num_kept_groups: int, target_groups: int, num_gen_batches: int, max_gen_batches: int) -> bool:
    """True while another generation batch should be drawn: fewer than target_groups kept and fewer than
    max_gen_batches generated (max_gen_batches ≤ 0 = unbounded). When it returns False with too few groups the
    caller trains on what it has (and logs it) — it never aborts."""
    if num_kept_groups >= target_groups:
        return False
    return max_gen_batches <= 0 or num_gen_batches < max_gen_batches
