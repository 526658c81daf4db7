"""The actor objective: registered policy loss + add-ons (TIS, entropy, KL loss, VAPO NLL, CHORD), aggregated.

Add-ons, per token [B, T] (all 0 on padding):
  tis_weight      min(exp(old_logp − rollout_logp), C), detached, 1 on fixed rows (their rollout log-probs
                  came from the fix prompt); multiplied into the policy loss.
  entropy bonus   −entropy_coeff · H_t (aggregated with loss_agg_mode).
  KL loss         +kl_loss_coef · k(logp, ref_logp) (kl.py; aggregated with loss_agg_mode).
  VAPO pos NLL    +pos_nll_coef · (−logp) on rows with is_positive, token-mean over positive tokens.
  CHORD-φ         total = (1−μ)·policy + μ·SFT, SFT = −sg(p(1−p))·logp on fixed (expert) rows, p = exp(logp),
                  token-mean over fixed tokens (μ = chord_mu; 0 disables).
Off-policy shaping of the fixed rows (rfpo.offpolicy_shaping; replaces their policy loss, so R_off, the clip and
TIS do not act on them; aggregated with the rest):
  luffy           −A·f(p_t),  f(x) = x/(x + c), p_t = exp(logp_t) (LUFFY's policy shaping, off-policy π = 1)
  guide           −A·f(r_t),  r_t = exp(logp_t − fix_logp_t): the fix token's probability on the plain prompt
                  over the one it was sampled with under the fix prompt (the engine's log-prob), per token
Every term divides by WHOLE-step counts (StepCounts) so micro-batch values add up exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rfpo_megatron.algos.aggregation import aggregate
from rfpo_megatron.algos.kl import kl_loss
from rfpo_megatron.algos.registry import get_policy_loss
from rfpo_megatron.algos.stats import masked_mean
from rfpo_megatron.config import OFFPOLICY_SHAPINGS, unknown_name_message


@dataclass
class StepCounts:
    """Global (whole step: all micro-batches, all DP ranks that sum gradients) normalisers."""

    num_tokens: float
    num_seqs: float
    num_pos_tokens: float = 0.0
    num_fixed_tokens: float = 0.0

    @staticmethod
    def local(response_mask: Tensor, is_positive: Tensor | None = None, is_fixed: Tensor | None = None) -> "StepCounts":
        """This batch's own counts (sum them across micro-batches / ranks for the global ones)."""
        m = response_mask.bool()
        pos = 0.0 if is_positive is None else float((m & is_positive.bool().unsqueeze(-1)).sum())
        fix = 0.0 if is_fixed is None else float((m & is_fixed.bool().unsqueeze(-1)).sum())
        return StepCounts(float(m.sum()), float(m.any(-1).sum()), pos, fix)

    def __add__(self, o: "StepCounts") -> "StepCounts":
        return StepCounts(self.num_tokens + o.num_tokens, self.num_seqs + o.num_seqs, self.num_pos_tokens + o.num_pos_tokens, self.num_fixed_tokens + o.num_fixed_tokens)


def tis_weight(old_logp: Tensor, rollout_logp: Tensor, tis_cap: float, is_fixed: Tensor | None = None) -> Tensor:
    """Truncated IS weight [B, T] = min(exp(old_logp − rollout_logp), tis_cap), detached; 1 on fixed rows."""
    if not tis_cap > 0:
        raise ValueError(f"tis_cap: must be > 0 or null (got {tis_cap})")
    w = torch.exp(torch.clamp(old_logp.detach() - rollout_logp.detach(), max=20.0)).clamp(max=tis_cap)
    if is_fixed is not None:
        w = torch.where(is_fixed.bool().unsqueeze(-1), torch.ones_like(w), w)
    return w


def offpolicy_shaped_loss(logp: Tensor, advantages: Tensor, mode: str, c: float,
                          fix_logp: Tensor | None = None) -> Tensor:
    """Per-token −A·x/(x + c) [B, T] with x = exp(logp) (luffy) or exp(logp − fix_logp) (guide; log-ratio
    clamped to ±20). d/dlogp = −A·c·x/(x + c)²: largest where x ≈ c, so low-probability fix tokens get the
    push and tokens the policy already finds likely get little (the gradient never vanishes as the ratio
    grows the way a clipped ratio's does, and never explodes as an unbounded ratio would)."""
    if mode == "luffy":
        x = torch.exp(logp)
    elif mode == "guide":
        if fix_logp is None:
            raise ValueError("rfpo.offpolicy_shaping=guide needs the fix tokens' log-probs under the fix prompt "
                             "(the rollout engine's log-probs of the fixed rows)")
        x = torch.exp(torch.clamp(logp - fix_logp.detach(), -20.0, 20.0))
    else:
        raise ValueError(unknown_name_message("rfpo.offpolicy_shaping", mode, OFFPOLICY_SHAPINGS[1:]))
    if not c > 0:
        raise ValueError(f"rfpo.shaping_c: must be > 0 (got {c})")
    return -advantages * x / (x + c)


def chord_sft_loss(logp: Tensor, response_mask: Tensor, is_fixed: Tensor) -> Tensor:
    """CHORD-φ SFT term per token [B, T]: −sg(p(1−p))·logp on fixed rows' valid tokens, 0 elsewhere."""
    m = response_mask.bool() & is_fixed.bool().unsqueeze(-1)
    lp = torch.where(m, logp, torch.zeros_like(logp))
    p = lp.detach().exp()
    loss = -(p * (1 - p)) * lp
    return torch.where(m, loss, torch.zeros_like(loss))


def pos_nll_loss(logp: Tensor, response_mask: Tensor, is_positive: Tensor) -> Tensor:
    """VAPO positive-example NLL per token [B, T]: −logp on rows with is_positive, 0 elsewhere."""
    m = response_mask.bool() & is_positive.bool().unsqueeze(-1)
    return torch.where(m, -logp, torch.zeros_like(logp))


def compute_actor_loss(
    policy_loss: str,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    counts: StepCounts | None = None,
    loss_agg_max_len: int | None = None,
    log_roff: Tensor | None = None,
    loss_form: str = "faithful",
    is_fixed: Tensor | None = None,
    rollout_logp: Tensor | None = None,
    tis_cap: float | None = None,
    tis_weights: Tensor | None = None,
    pg_tokens: tuple[Tensor, dict] | None = None,
    entropy: Tensor | None = None,
    entropy_coeff: float = 0.0,
    ref_logp: Tensor | None = None,
    use_kl_loss: bool = False,
    kl_loss_coef: float = 0.0,
    kl_loss_type: str = "k3",
    is_positive: Tensor | None = None,
    pos_nll_coef: float = 0.0,
    chord_mu: float = 0.0,
    offpolicy_shaping: str = "none",
    shaping_c: float = 0.1,
    fix_logp: Tensor | None = None,
    **loss_kw,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar loss for this (micro-)batch and detached metrics. Shapes: logp/old_logp/advantages/response_mask/
    rollout_logp/entropy/ref_logp [B, T]; log_roff/is_fixed/is_positive [B]. `counts` = whole-step StepCounts
    (default: this batch's). loss_kw go to the policy loss (clip_ratio_low/high/c, ecpo_delta, bapo_*, …).
    tis_weights [B, T]: precomputed TIS weights (instead of tis_cap + rollout_logp). pg_tokens = (per-token
    policy loss [B, T], metrics) computed elsewhere (the fused loss kernel, TIS already applied): used instead
    of calling the registry loss; every add-on and the aggregation are still done here. offpolicy_shaping
    (luffy | guide) replaces the fixed rows' (is_fixed) policy loss by offpolicy_shaped_loss; fix_logp [B, T]
    (guide) = the engine's log-probs of those rows under the fix prompt."""
    fn = get_policy_loss(policy_loss)
    m = response_mask.bool()
    c = counts or StepCounts.local(m, is_positive, is_fixed)
    agg = dict(global_num_tokens=c.num_tokens, global_num_seqs=c.num_seqs, max_len=loss_agg_max_len)
    if pg_tokens is not None:
        pg, metrics = pg_tokens[0], dict(pg_tokens[1])
    else:
        pg, metrics = fn(logp, old_logp, advantages, m, log_roff=log_roff, loss_form=loss_form, **loss_kw)
    if tis_weights is not None and pg_tokens is None:
        w = tis_weights.detach().to(pg.dtype)
        pg = pg * w
        metrics["tis_weight_mean"] = masked_mean(w, m)
    elif tis_cap is not None and pg_tokens is None:
        if rollout_logp is None:
            raise ValueError("tis_cap is set but rollout_logp was not given (the rollout engine's log-probs)")
        w = tis_weight(old_logp, rollout_logp, tis_cap, is_fixed)
        pg = pg * w
        metrics["tis_weight_mean"] = masked_mean(w, m)
    if offpolicy_shaping != "none" and is_fixed is not None and bool(is_fixed.any()):
        shaped = offpolicy_shaped_loss(logp, advantages, offpolicy_shaping, shaping_c, fix_logp)
        rows = is_fixed.bool().unsqueeze(-1) & m
        pg = torch.where(rows, shaped.to(pg.dtype), pg)
    pg_loss = aggregate(pg, m, loss_agg_mode, **agg)
    metrics["pg_loss"] = pg_loss.detach()
    total = pg_loss if not chord_mu else (1.0 - chord_mu) * pg_loss
    if entropy is not None and entropy_coeff:
        ent = aggregate(entropy, m, loss_agg_mode, **agg)
        total = total - entropy_coeff * ent
        metrics["entropy"] = ent.detach()
    if use_kl_loss:
        if ref_logp is None:
            raise ValueError("use_kl_loss is set but ref_logp was not given (reference policy log-probs)")
        kl = aggregate(kl_loss(logp, ref_logp, m, kl_loss_type), m, loss_agg_mode, **agg)
        total = total + kl_loss_coef * kl
        metrics["kl_loss"] = kl.detach()
    if pos_nll_coef:
        if is_positive is None:
            raise ValueError("pos_nll_coef > 0 needs is_positive [B] (responses with reward 1)")
        nll = aggregate(pos_nll_loss(logp, m, is_positive), m, "token-mean", global_num_tokens=c.num_pos_tokens)
        total = total + pos_nll_coef * nll
        metrics["pos_nll"] = nll.detach()
    if chord_mu:
        if is_fixed is None:
            raise ValueError("chord_mu > 0 needs is_fixed [B] (expert/fixed responses)")
        sft = aggregate(chord_sft_loss(logp, m, is_fixed), m, "token-mean", global_num_tokens=c.num_fixed_tokens)
        total = total + chord_mu * sft
        metrics["chord_sft"] = sft.detach()
    return total, metrics
