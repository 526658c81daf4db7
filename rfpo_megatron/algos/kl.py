"""KL estimators k1/k2/k3 between the policy and the reference, as a loss term and as a reward penalty.

With Δ = ref_logp − logp (per token, [B, T]):
  k1 = −Δ            (= logp − ref_logp; unbiased, can be negative)
  k2 = ½·Δ²
  k3 = exp(Δ) − Δ − 1 (≥ 0, "low-variance KL", Schulman 2020)
No clamping is applied (the values are exact); inputs come from finite log-probs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rfpo_megatron.algos.registry import unknown_name_message
from rfpo_megatron.algos.stats import masked_mean, place_at_last_token

KL_TYPES = ("k1", "k2", "k3")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kl_type: str = "k3") -> Tensor:
    """Per-token KL estimate [B, T] of π_θ ‖ π_ref from log-probs logp, ref_logp [B, T]."""
    delta = ref_logp - logp
    if kl_type == "k1":
        return -delta
    if kl_type == "k2":
        return 0.5 * delta * delta
    if kl_type == "k3":
        return torch.expm1(delta) - delta
    raise ValueError(unknown_name_message("kl_loss_type", kl_type, KL_TYPES))


def kl_loss(logp: Tensor, ref_logp: Tensor, response_mask: Tensor, kl_type: str = "k3") -> Tensor:
    """KL as a loss term, per token [B, T] (0 on padding, where no input value can reach the gradient);
    multiply by `kl_loss_coef` and aggregate."""
    m = response_mask.bool()
    lp = torch.where(m, logp, torch.zeros_like(logp))
    rf = torch.where(m, ref_logp, torch.zeros_like(ref_logp))
    kl = kl_estimate(lp, rf, kl_type)
    return torch.where(m, kl, torch.zeros_like(kl))


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
