"""Rollout correction: the rollout-engine <-> trainer mismatch, as per-token weights and loss masks.

With lr_t = old_logp_t − rollout_logp_t (log ρ_t, ρ_t = π_train/π_rollout) on the eligible tokens (response
tokens of rows whose rollout log-probs are usable; never fixed rows), each mode of the chain maps
(lr, keep) -> (weight | None, keep'); weights multiply, masks AND, in chain order, and a mode's sequence
statistic is taken over the tokens still kept when it runs (mean/sum over kept tokens of the row):
  tis           w_t = min(ρ_t, C)                                   C = algo.tis_cap
  icepop        keep_t &= low <= ρ_t <= high
  seq_mask_tis  keep_i &= low <= exp(mean_t lr_t) <= high; w_t = min(ρ_t, C)
  seq_is        w_t = min(exp(Σ_t lr_t), C_seq)  (the same for every token of the row)
  token_reject  keep_t &= |k_t| <= τ_tok
  seq_reject    keep_i &= |mean_t k_t| <= τ_seq
k of the rollout policy against the trainer's (samples from the rollout policy): k1 = −lr, k2 = ½·lr²,
k3 = ρ − 1 − lr. Everything in float64; weights are detached (they are computed from detached log-probs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rfpo_megatron.algos.registry import get_rollout_correction, register_rollout_correction


def _row_mean(x: Tensor, keep: Tensor) -> Tensor:
    """[B] mean of x over each row's kept tokens (0 for a row with none)."""
    return torch.where(keep, x, torch.zeros_like(x)).sum(-1) / keep.sum(-1).clamp(min=1)


def _capped_exp(x: Tensor, cap: float) -> Tensor:
    """min(exp(x), cap) without overflow."""
    return torch.exp(torch.clamp(x, max=math.log(cap)))


def divergence(log_ratio: Tensor, kl_type: str) -> Tensor:
    """Per-token k1 / k2 / k3 of the rollout policy vs the trainer's from lr = old − rollout."""
    if kl_type == "k1":
        return -log_ratio
    if kl_type == "k2":
        return 0.5 * log_ratio * log_ratio
    if kl_type == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"reject_kl_type: '{kl_type}' is not one of ['k1', 'k2', 'k3']")


@register_rollout_correction("tis")
def tis(log_ratio: Tensor, keep: Tensor, *, tis_cap: float, **_) -> tuple[Tensor, Tensor]:
    return _capped_exp(log_ratio, tis_cap), keep


@register_rollout_correction("icepop")
def icepop(log_ratio: Tensor, keep: Tensor, *, icepop_low: float, icepop_high: float, **_) -> tuple[None, Tensor]:
    r = torch.exp(log_ratio)
    return None, keep & (r >= icepop_low) & (r <= icepop_high)


@register_rollout_correction("seq_mask_tis")
def seq_mask_tis(log_ratio: Tensor, keep: Tensor, *, tis_cap: float, seq_mask_low: float, seq_mask_high: float,
                 **_) -> tuple[Tensor, Tensor]:
    g = torch.exp(_row_mean(log_ratio, keep))
    ok = (g >= seq_mask_low) & (g <= seq_mask_high)
    return _capped_exp(log_ratio, tis_cap), keep & ok.unsqueeze(-1)


@register_rollout_correction("seq_is")
def seq_is(log_ratio: Tensor, keep: Tensor, *, seq_is_cap: float, **_) -> tuple[Tensor, Tensor]:
    s = torch.where(keep, log_ratio, torch.zeros_like(log_ratio)).sum(-1, keepdim=True)
    return _capped_exp(s, seq_is_cap).expand_as(log_ratio), keep


@register_rollout_correction("token_reject")
def token_reject(log_ratio: Tensor, keep: Tensor, *, reject_kl_type: str, token_reject_threshold: float,
                 **_) -> tuple[None, Tensor]:
    return None, keep & (divergence(log_ratio, reject_kl_type).abs() <= token_reject_threshold)


@register_rollout_correction("seq_reject")
def seq_reject(log_ratio: Tensor, keep: Tensor, *, reject_kl_type: str, seq_reject_threshold: float,
               **_) -> tuple[None, Tensor]:
    k = _row_mean(divergence(log_ratio, reject_kl_type), keep)
    return None, keep & (k.abs() <= seq_reject_threshold).unsqueeze(-1)


def apply_rollout_correction(modes: list, old_logp: Tensor, rollout_logp: Tensor, eligible: Tensor,
                             **knobs) -> tuple[Tensor | None, Tensor, dict[str, float]]:
    """Run the chain `modes` on [B, T] log-probs; `eligible` [B, T] bool = the tokens it may act on.

    Returns (weights [B, T] float32, 1 off the eligible tokens, or None when no mode weights; keep [B, T] bool,
    False exactly on the tokens the chain masked (True off the eligible tokens); metrics): rollout_logprob_gap_mean
    / _max (|lr| over eligible tokens), per mode <mode>_masked_frac (tokens it masked / eligible tokens),
    <mode>_seq_frac (sequences it emptied / eligible sequences) for sequence modes, <mode>_weight_mean (over the
    tokens kept when it ran) for weighting modes, and kept_frac."""
    elig = eligible.bool()
    lr = torch.where(elig, old_logp.detach().double() - rollout_logp.detach().double(), torch.zeros((), dtype=torch.float64))
    n_tok, n_seq = max(int(elig.sum()), 1), max(int(elig.any(-1).sum()), 1)
    gap = lr.abs()[elig]
    met = {"rollout_logprob_gap_mean": float(gap.mean()) if gap.numel() else 0.0,
           "rollout_logprob_gap_max": float(gap.max()) if gap.numel() else 0.0}
    keep, w = elig.clone(), None
    for name in modes:
        wi, new = get_rollout_correction(name)(lr, keep, **knobs)
        if wi is not None:
            w = wi if w is None else w * wi
            met[f"{name}_weight_mean"] = float(wi[keep].mean()) if bool(keep.any()) else 1.0
        if new is not keep:
            met[f"{name}_masked_frac"] = float((keep & ~new).sum()) / n_tok
            if name.startswith("seq"):
                met[f"{name}_seq_frac"] = float((keep.any(-1) & ~new.any(-1)).sum()) / n_seq
            keep = new
    met["kept_frac"] = float(keep.sum()) / n_tok
    weights = None if w is None else torch.where(elig, w, torch.ones_like(w)).float()
    return weights, keep | ~elig, met
