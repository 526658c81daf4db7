"""Advantage estimators of the GRPO family (registered in ADV_ESTIMATORS) and `compute_advantages`.

Every estimator: `fn(*, rewards [B], group_ids [B] long, response_mask [B, T], **kw)
-> (advantages [B, T], returns [B, T])`, both 0 on padding, no gradient (computed under no_grad).
Responses sharing a group id are the G samples of one prompt (ids need not be contiguous or sorted).
Unknown keywords are ignored so a trainer may pass one bag of config values to any estimator.
Group stats are computed in float64; outputs have the dtype of `rewards` (float32 if it is integral).
Groups whose rewards are all equal (including G = 1) get advantage exactly 0 for the group-baseline
estimators (grpo, dr_grpo, rloo), never NaN.

Which samples to train on (`reinforce_rej` drops constant groups, `raft` keeps only max-reward samples)
is given by `sample_keep_mask(name, rewards, group_ids)` -> [B] bool; multiply it into response_mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rfpo_megatron.algos.kl import kl_estimate
from rfpo_megatron.algos.registry import get_adv_estimator, register_adv_estimator
from rfpo_megatron.algos.stats import group_stats, masked_whiten, place_at_last_token

ESTIMATOR_NAMES = (
    "grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "reinforce_pp_baseline",
    "remax", "gae", "reinforce_rej", "raft",
)  # fmt: skip


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.float32


def _broadcast(adv: Tensor, response_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Scalar per sample [B] -> [B, T] on valid tokens, 0 elsewhere."""
    a = adv.to(dtype).unsqueeze(-1).expand(response_mask.shape)
    return torch.where(response_mask.bool(), a, torch.zeros((), dtype=dtype, device=a.device))


def _check(rewards: Tensor, group_ids: Tensor, response_mask: Tensor) -> None:
    if rewards.dim() != 1 or group_ids.shape != rewards.shape or response_mask.dim() != 2 or response_mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"advantage inputs: expected rewards [B], group_ids [B], response_mask [B, T]; got "
            f"{tuple(rewards.shape)}, {tuple(group_ids.shape)}, {tuple(response_mask.shape)}"
        )


@register_adv_estimator("grpo")
@torch.no_grad()
def grpo_advantage(*, rewards, group_ids, response_mask, norm_adv_by_std: bool = True, eps: float = 1e-6, **_):
    """GRPO: A_i = (r_i − mean_g r) / (std_g r + eps) (unbiased std); without the division if not norm_adv_by_std."""
    _check(rewards, group_ids, response_mask)
    st = group_stats(rewards, group_ids)
    r = rewards.to(torch.float64)
    a = r - st["mean"]
    if norm_adv_by_std:
        a = a / (st["std"] + eps)
    a = torch.where(st["all_equal"], torch.zeros_like(a), a)
    out = _broadcast(a, response_mask, _out_dtype(rewards))
    return out, out.clone()


@register_adv_estimator("dr_grpo")
@torch.no_grad()
def dr_grpo_advantage(*, rewards, group_ids, response_mask, **_):
    """Dr.GRPO: A_i = r_i − mean_g r (no std division); pair with loss_agg_mode=seq-mean-token-sum-norm."""
    return grpo_advantage(rewards=rewards, group_ids=group_ids, response_mask=response_mask, norm_adv_by_std=False)


@register_adv_estimator("rloo")
@torch.no_grad()
def rloo_advantage(*, rewards, group_ids, response_mask, **_):
    """RLOO: A_i = r_i − mean_{j≠i} r_j = G/(G−1)·(r_i − mean_g r); 0 when G = 1."""
    _check(rewards, group_ids, response_mask)
    st = group_stats(rewards, group_ids)
    r = rewards.to(torch.float64)
    n = st["count"]
    a = torch.where(n > 1, (r - st["mean"]) * n / (n - 1).clamp(min=1), torch.zeros_like(r))
    a = torch.where(st["all_equal"], torch.zeros_like(a), a)
    out = _broadcast(a, response_mask, _out_dtype(rewards))
    return out, out.clone()


@register_adv_estimator("reinforce")
@torch.no_grad()
def reinforce_advantage(*, rewards, group_ids, response_mask, **_):
    """REINFORCE without baseline: A_i = r_i."""
    _check(rewards, group_ids, response_mask)
    out = _broadcast(rewards.to(torch.float64), response_mask, _out_dtype(rewards))
    return out, out.clone()


def _discounted_suffix_sum(token_rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """G_t = Σ_{t' ≥ t, valid} γ^(#valid steps between) r_t' over valid tokens ([B, T]); 0 on padding."""
    m = response_mask.bool()
    if gamma == 1.0:  # undiscounted: a reverse cumulative sum (padding carries 0 reward)
        tok = torch.where(m, token_rewards, torch.zeros_like(token_rewards))
        ret = tok.flip(-1).cumsum(-1).flip(-1)
        return torch.where(m, ret, torch.zeros_like(ret))
    ret = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        new = token_rewards[:, t] + gamma * running
        running = torch.where(m[:, t], new, running)
        ret[:, t] = torch.where(m[:, t], running, torch.zeros_like(running))
    return ret


def _reinforce_pp(scores, *, response_mask, old_logp, ref_logp, kl_in_reward_coef, kl_in_reward_type, gamma, token_level_rewards, out_dtype):
    m = response_mask.bool()
    tok = place_at_last_token(scores, response_mask) if token_level_rewards is None else token_level_rewards.to(torch.float64)
    if kl_in_reward_coef:
        if old_logp is None or ref_logp is None:
            raise ValueError("reinforce_pp: kl_in_reward_coef > 0 needs old_logp and ref_logp [B, T]")
        kl = kl_estimate(old_logp.to(torch.float64), ref_logp.to(torch.float64), kl_in_reward_type)
        tok = tok - kl_in_reward_coef * torch.where(m, kl, torch.zeros_like(kl))
    returns = _discounted_suffix_sum(tok, response_mask, gamma)
    adv = masked_whiten(returns, m)
    return adv.to(out_dtype), returns.to(out_dtype)


@register_adv_estimator("reinforce_pp")
@torch.no_grad()
def reinforce_pp_advantage(
    *, rewards, group_ids, response_mask, old_logp=None, ref_logp=None, kl_in_reward_coef: float = 0.0,
    kl_in_reward_type: str = "k1", gamma: float = 1.0, token_level_rewards=None, **_,
):
    """REINFORCE++: token reward −β·k(old_logp, ref_logp) plus r_i on the last token (or `token_level_rewards`
    [B, T] instead of r_i placed last), return G_t = discounted suffix sum, advantage = G whitened over all valid
    tokens of the batch ((G − mean)/sqrt(var_unbiased + 1e-8)). returns = G."""
    _check(rewards, group_ids, response_mask)
    return _reinforce_pp(
        rewards.to(torch.float64), response_mask=response_mask, old_logp=old_logp, ref_logp=ref_logp,
        kl_in_reward_coef=kl_in_reward_coef, kl_in_reward_type=kl_in_reward_type, gamma=gamma,
        token_level_rewards=token_level_rewards, out_dtype=_out_dtype(rewards),
    )


@register_adv_estimator("reinforce_pp_baseline")
@torch.no_grad()
def reinforce_pp_baseline_advantage(
    *, rewards, group_ids, response_mask, old_logp=None, ref_logp=None, kl_in_reward_coef: float = 0.0,
    kl_in_reward_type: str = "k1", gamma: float = 1.0, **_,
):
    """REINFORCE++-baseline: as reinforce_pp with r_i replaced by r_i − mean_g r (exactly 0 for constant groups)."""
    _check(rewards, group_ids, response_mask)
    st = group_stats(rewards, group_ids)
    centred = rewards.to(torch.float64) - st["mean"]
    centred = torch.where(st["all_equal"], torch.zeros_like(centred), centred)
    return _reinforce_pp(
        centred, response_mask=response_mask, old_logp=old_logp, ref_logp=ref_logp,
        kl_in_reward_coef=kl_in_reward_coef, kl_in_reward_type=kl_in_reward_type, gamma=gamma,
        token_level_rewards=None, out_dtype=_out_dtype(rewards),
    )


@register_adv_estimator("remax")
@torch.no_grad()
def remax_advantage(*, rewards, group_ids, response_mask, baseline_rewards=None, **_):
    """ReMax: A_i = r_i − b_i, b_i = reward of the greedy response to the same prompt (`baseline_rewards` [B]).
    returns = r_i broadcast."""
    _check(rewards, group_ids, response_mask)
    if baseline_rewards is None or baseline_rewards.shape != rewards.shape:
        raise ValueError("remax: needs baseline_rewards [B] (reward of the greedy response per sample)")
    dt = _out_dtype(rewards)
    r = rewards.to(torch.float64)
    adv = _broadcast(r - baseline_rewards.to(torch.float64), response_mask, dt)
    return adv, _broadcast(r, response_mask, dt)


@register_adv_estimator("gae")
@torch.no_grad()
def gae_advantage(
    *, rewards, group_ids, response_mask, values=None, token_level_rewards=None, gamma: float = 1.0,
    lam: float = 1.0, critic_lam: float | None = None, whiten: bool = True, **_,
):
    """GAE (PPO with a critic). values [B, T] = V(s_t); token rewards = `token_level_rewards` [B, T] or r_i on the
    last valid token. Over the valid tokens of each row (padding/holes skipped, V after the last token = 0):
    δ_t = r_t + γ V_next − V_t, A_t = δ_t + γλ A_next. returns = A^(critic_lam) + V (VAPO's decoupled λ:
    critic_lam defaults to lam). Advantages are whitened over the batch's valid tokens if `whiten`."""
    _check(rewards, group_ids, response_mask)
    if values is None or values.shape != response_mask.shape:
        raise ValueError("gae: needs values [B, T] from the critic")
    dt = _out_dtype(rewards)
    m = response_mask.bool()
    tok = place_at_last_token(rewards.to(torch.float64), response_mask) if token_level_rewards is None else token_level_rewards.to(torch.float64)
    v = values.to(torch.float64)

    def run(lmbda: float) -> Tensor:
        adv = torch.zeros_like(tok)
        next_v = torch.zeros_like(tok[:, 0])
        next_a = torch.zeros_like(tok[:, 0])
        for t in reversed(range(tok.shape[1])):
            delta = tok[:, t] + gamma * next_v - v[:, t]
            a = delta + gamma * lmbda * next_a
            next_v = torch.where(m[:, t], v[:, t], next_v)
            next_a = torch.where(m[:, t], a, next_a)
            adv[:, t] = torch.where(m[:, t], a, torch.zeros_like(a))
        return adv

    adv = run(lam)
    adv_c = adv if critic_lam is None or critic_lam == lam else run(critic_lam)
    returns = torch.where(m, adv_c + v, torch.zeros_like(v))
    if whiten:
        adv = masked_whiten(adv, m)
    return adv.to(dt), returns.to(dt)


@register_adv_estimator("reinforce_rej")
@torch.no_grad()
def reinforce_rej_advantage(*, rewards, group_ids, response_mask, **_):
    """Reinforce-Rej (Xiong et al. 2025): the paper's binary reward is ±1, so a verifier reward r ∈ [0, 1] is
    mapped to 2r − 1 (correct +1, wrong −1); A_i = 2r_i − 1 on groups whose rewards are not all equal. Groups
    that are all correct or all wrong are dropped (advantage 0 here, removed by sample_keep_mask)."""
    _check(rewards, group_ids, response_mask)
    st = group_stats(rewards, group_ids)
    r = 2.0 * rewards.to(torch.float64) - 1.0
    a = torch.where(st["all_equal"], torch.zeros_like(r), r)
    out = _broadcast(a, response_mask, _out_dtype(rewards))
    return out, out.clone()


def raft_keep(rewards: Tensor, group_ids: Tensor, raft_min_reward: float | None = None) -> Tensor:
    """RAFT selection [B] bool: positively rewarded samples only — r_i > 0 (or r_i ≥ raft_min_reward when
    given) and r_i equal to its group's maximum (best-of-G; for binary rewards: every correct sample). An
    all-wrong group keeps nothing."""
    st = group_stats(rewards, group_ids)
    r = rewards.to(torch.float64)
    keep = (r == st["max"]) & (r > 0)
    if raft_min_reward is not None:
        keep = keep & (r >= raft_min_reward)
    return keep


@register_adv_estimator("raft")
@torch.no_grad()
def raft_advantage(*, rewards, group_ids, response_mask, raft_min_reward: float | None = None, **_):
    """RAFT (rejection-sampling fine-tuning, Dong et al. 2023; as in Xiong et al. 2025): A_i = 1 on kept samples
    (positive reward, group max), 0 on the others, so `reinforce_loss` = NLL on kept samples and `raft_pp` =
    clipped ratio on them. Drop the others with sample_keep_mask."""
    _check(rewards, group_ids, response_mask)
    keep = raft_keep(rewards, group_ids, raft_min_reward)
    out = _broadcast(keep.to(torch.float64), response_mask, _out_dtype(rewards))
    return out, out.clone()


@torch.no_grad()
def sample_keep_mask(name: str, rewards: Tensor, group_ids: Tensor, *, raft_min_reward: float | None = None) -> Tensor:
    """[B] bool: which samples enter the loss under estimator `name` (all True except reinforce_rej / raft)."""
    get_adv_estimator(name)
    if name == "reinforce_rej":
        return ~group_stats(rewards, group_ids)["all_equal"]
    if name == "raft":
        return raft_keep(rewards, group_ids, raft_min_reward)
    return torch.ones_like(rewards, dtype=torch.bool)


def compute_advantages(name: str, *, rewards: Tensor, group_ids: Tensor, response_mask: Tensor, **kw) -> tuple[Tensor, Tensor]:
    """Dispatch to ADV_ESTIMATORS[name]; returns (advantages [B, T], returns [B, T]).

    Extra keywords by estimator: grpo — norm_adv_by_std, eps; remax — baseline_rewards [B];
    reinforce_pp(_baseline) — old_logp, ref_logp [B, T], kl_in_reward_coef, kl_in_reward_type, gamma;
    gae — values [B, T], token_level_rewards [B, T], gamma, lam, critic_lam, whiten; raft — raft_min_reward.
    """
    return get_adv_estimator(name)(rewards=rewards, group_ids=group_ids, response_mask=response_mask, **kw)
