"""Test-only helpers of the algorithm tests (moved out of rfpo_megatron/algos: the package does not use them).

apply_kl_in_reward: token rewards with a KL penalty (the trainer's KL in reward is train.batch.advantages);
dynamic_sampling_filter / dynamic_sampling_continue: the DAPO group filter and refill rule (the trainer's is
train.generation.dynamic_sampling); roff_stats: R_off statistics over fixed rows (the trainer logs
logging.metrics.roff_metrics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rfpo_megatron.algos.kl import kl_estimate
from rfpo_megatron.algos.stats import group_stats, masked_mean, place_at_last_token


def apply_kl_in_reward(
    rewards: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor,
    response_mask: Tensor,
    *,
    kl_in_reward_coef: float,
    kl_in_reward_type: str = "k1",
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL penalty in the reward (`use_kl_in_reward`).

    rewards: outcome rewards [B] (placed on the last valid token) or token-level scores [B, T].
    Returns token-level rewards [B, T] = scores − β·k(old_logp, ref_logp) on valid tokens, and
    metrics {"kl_in_reward": masked mean KL}. Sum over T to get a scalar reward for group estimators.
    """
    token_scores = place_at_last_token(rewards, response_mask) if rewards.dim() == 1 else rewards
    kl = kl_estimate(old_logp.detach(), ref_logp.detach(), kl_in_reward_type)
    kl = torch.where(response_mask.bool(), kl, torch.zeros_like(kl))
    out = token_scores - kl_in_reward_coef * kl.to(token_scores.dtype)
    return out, {"kl_in_reward": masked_mean(kl, response_mask).detach()}


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


@torch.no_grad()
def roff_stats(log_roff: Tensor, is_fixed: Tensor, clip: float | None = None, *, raw_log_roff: Tensor | None = None) -> dict[str, float]:
    """W&B metrics over fixed rows: roff_mean/min/max (of R_off = exp(log_roff)), roff_clamped_frac (share at
    ±clip, or, given raw_log_roff, share with |raw| > clip), fixed_seq_frac. All 0 when nothing is fixed
    (roff_* = 1.0 then, the unfixed value)."""
    f = is_fixed.bool()
    n = int(f.sum())
    out = {"fixed_seq_frac": n / max(1, f.numel())}
    if n == 0:
        out.update(roff_mean=1.0, roff_min=1.0, roff_max=1.0, roff_clamped_frac=0.0)
        return out
    lr = log_roff[f].to(torch.float64)
    r = lr.exp()
    out.update(roff_mean=float(r.mean()), roff_min=float(r.min()), roff_max=float(r.max()))
    if clip is None:
        out["roff_clamped_frac"] = 0.0
    elif raw_log_roff is not None:
        out["roff_clamped_frac"] = float((raw_log_roff[f].abs() > clip).to(torch.float64).mean())
    else:
        out["roff_clamped_frac"] = float((lr.abs() >= clip * (1 - 1e-6)).to(torch.float64).mean())
    return out
