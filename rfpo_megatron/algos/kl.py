"""KL estimators k1/k2/k3 between the policy and the reference, as a loss term and as a reward penalty.

With Δ = ref_logp − logp (per token, [B, T]):
  k1 = −Δ            (= logp − ref_logp; unbiased, can be negative)
  k2 = ½·Δ²
  k3 = exp(Δ) − Δ − 1 (≥ 0, "low-variance KL", Schulman 2020), clamped to [−10, 10] as verl's low_var_kl
  k1+, k3+ = straight-through variants (verl): the value of k1 / k3, the gradient of k2 (i.e.
             k2 − sg(k2) + sg(k)), so the loss reports the unbiased estimate and trains with the k2 gradient.
KL in reward: fixed coefficient β, or `AdaptiveKLController` (PPO / verl): β ← β·(1 + clip(KL/target − 1,
±0.2)·n/horizon) after every step, n = sequences in the step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rfpo_megatron.config import unknown_name_message

KL_TYPES = ("k1", "k2", "k3", "k1+", "k3+")
K3_CLAMP = 10.0  # verl clamps low_var_kl (k3) to ±10


def kl_estimate(logp: Tensor, ref_logp: Tensor, kl_type: str = "k3") -> Tensor:
    """Per-token KL estimate [B, T] of π_θ ‖ π_ref from log-probs logp, ref_logp [B, T]."""
    if kl_type not in KL_TYPES:
        raise ValueError(unknown_name_message("algo.kl_loss_type / algo.kl_in_reward_type", kl_type, KL_TYPES))
    delta = ref_logp - logp
    if kl_type.endswith("+"):  # straight-through: forward value of k1 / k3, backward of k2
        k2 = 0.5 * delta * delta
        return k2 - k2.detach() + kl_estimate(logp, ref_logp, kl_type[:-1]).detach()
    if kl_type == "k1":
        return -delta
    if kl_type == "k2":
        return 0.5 * delta * delta
    return torch.clamp(torch.expm1(delta) - delta, -K3_CLAMP, K3_CLAMP)


def kl_loss(logp: Tensor, ref_logp: Tensor, response_mask: Tensor, kl_type: str = "k3") -> Tensor:
    """KL as a loss term, per token [B, T] (0 on padding, where no input value can reach the gradient);
    multiply by `kl_loss_coef` and aggregate."""
    m = response_mask.bool()
    lp = torch.where(m, logp, torch.zeros_like(logp))
    rf = torch.where(m, ref_logp, torch.zeros_like(ref_logp))
    kl = kl_estimate(lp, rf, kl_type)
    return torch.where(m, kl, torch.zeros_like(kl))


class AdaptiveKLController:
    """β for the KL in the reward. Fixed (target None) or adaptive as in PPO (Ziegler et al. 2019) / verl:
    after each step, β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon), KL = the step's mean
    per-sequence KL (mean over each sequence's tokens, then over sequences), n_steps = its sequences."""

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000):
        if target is not None and not target > 0:
            raise ValueError(f"algo.kl_target: must be > 0 or null (got {target})")
        if not horizon > 0:
            raise ValueError(f"algo.kl_horizon: must be > 0 (got {horizon})")
        self.value, self.target, self.horizon = float(init_coef), target, int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, sd: dict) -> None:
        self.value = float(sd["value"])
