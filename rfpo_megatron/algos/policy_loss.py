"""Policy losses of the GRPO family (registered in POLICY_LOSSES), each with the RFPO R_off hook.

Common signature:
    fn(logp [B, T], old_logp [B, T], advantages [B, T], response_mask [B, T], *,
       log_roff [B] | None = None, loss_form = "faithful", clip_ratio_low = 0.2, clip_ratio_high = 0.2,
       clip_ratio_c = None, logp_sg = None, **loss-specific) -> (loss [B, T], metrics)
loss is per token, 0 on padding; aggregate it with aggregation.aggregate. metrics are detached 0-dim tensors
(local masked token means): clipfrac, ppo_kl (mean old_logp − logp), plus loss-specific ones.
Every config value a loss uses is an explicit keyword parameter (callers may fill them by signature
introspection); unknown keywords are ignored so one bag of config values can be passed to any loss.

ρ = exp(logp − old_logp) (log-ratio clamped to [−20, 20]). RFPO (algorithms.md §RFPO 5): R = exp(log_roff)
per sequence (detached; 1 for unfixed rows). Clipped-surrogate losses (ppo, gspo, gppo, ecpo, bapo, raft_pp):
    faithful:  L = −min(ρR·A, clip(ρR)·R·A)        corrected: L = −min(ρR·A, clip(ρR)·A)
    weighted:  L = −sg(R)·min(ρA, clip(ρ)·A)       (every loss: R multiplies the base per-token loss)
(the dual-clip bound uses the clipped-branch advantage, −c·R·A resp. −c·A). Single-term losses (cispo, aspo,
reinforce_loss): R multiplies the ratio, and in the faithful form also the advantage; in the weighted form R
multiplies the base loss (the trust region / IS weight acts on the real policy change ρ only). With log_roff
None nothing is multiplied; with log_roff ≡ 0 every product is by exactly 1.0, so results equal the base loss.
log_roff is clamped to ±max_log_roff(dtype) (so exp(2·log R)·ρ·A stays finite in the loss dtype).

`logp_sg` (default logp.detach()) is the value used inside stop-gradients (sg); passing a fixed tensor lets
torch.autograd.gradcheck verify the gradient of losses that use sg.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rfpo_megatron.algos.registry import register_policy_loss
from rfpo_megatron.config import unknown_name_message
from rfpo_megatron.algos.stats import masked_mean, masked_sum

LOSS_FORMS = ("faithful", "corrected", "weighted")
LOSS_NAMES = ("ppo", "gspo", "cispo", "gppo", "aspo", "ecpo", "bapo", "reinforce_loss", "raft_pp")
_LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------------------------- helpers
def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _masked(loss: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), loss, _zero(loss))


def _clean(mask: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor, logp_sg: Tensor | None = None):
    """Zero every [B, T] input on padding, so garbage there (even NaN/inf) reaches neither the loss nor any
    gradient (a `where` passes exactly-zero gradient to the unselected side)."""
    m = mask.bool()

    def z(x):
        return None if x is None else torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))

    return z(logp), z(old_logp), z(advantages), z(logp_sg)


def _log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    return torch.clamp(logp - old_logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def _sg(logp: Tensor, logp_sg: Tensor | None) -> Tensor:
    return logp.detach() if logp_sg is None else logp_sg.detach()


def max_log_roff(dtype: torch.dtype) -> float:
    """Largest |log R_off| for which every loss form stays finite in `dtype`: R² (faithful single-term losses)
    times ρ ≤ e^20 times |A|·(1 + ε) up to 1e4 must not overflow: (log(finfo.max) − 20 − log 1e4) / 2
    (29.7 for fp32/bf16, 340 for fp64; fp16 cannot hold R_off ≠ 1 safely: 0)."""
    return max(0.0, (math.log(torch.finfo(dtype).max) - _LOG_RATIO_CLAMP - math.log(1e4)) / 2)


def _roff(log_roff: Tensor | None, loss_form: str, advantages: Tensor) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """(R [B, 1] multiplying the ratio or None, advantage used in the clipped / single-term branch,
    w [B, 1] multiplying the per-token loss (weighted form) or None)."""
    if loss_form not in LOSS_FORMS:
        raise ValueError(unknown_name_message("rfpo.loss_form", loss_form, LOSS_FORMS))
    if log_roff is None:
        return None, advantages, None
    if log_roff.dim() != 1 or log_roff.shape[0] != advantages.shape[0]:
        raise ValueError(f"log_roff must have shape [B]={advantages.shape[0]}, got {tuple(log_roff.shape)}")
    bound = max_log_roff(advantages.dtype)
    r = torch.exp(log_roff.detach().to(advantages.dtype).clamp(-bound, bound)).unsqueeze(-1)
    if loss_form == "weighted":
        return None, advantages, r
    return r, (advantages * r if loss_form == "faithful" else advantages), None


def _times_r(x: Tensor, r: Tensor | None) -> Tensor:
    return x if r is None else x * r


def _check_c(clip_ratio_c: float | None) -> None:
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c: dual-clip constant must be > 1 (got {clip_ratio_c}); set null to disable")


def _clip_keep_grad(x: Tensor, lo: float, hi: float, x_sg: Tensor) -> Tensor:
    """Value clip(x, lo, hi); gradient weight lo / hi (instead of 0) outside the range: bound·x/sg(x)."""
    one = x / x_sg  # value exactly 1, gradient ∂x/x
    return torch.where(x > hi, hi * one, torch.where(x < lo, lo * one, x))


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    adv_clip: Tensor,
    response_mask: Tensor,
    *,
    lo: float,
    hi: float,
    clip_ratio_c: float | None = None,
    keep_grad: bool = False,
    ratio_sg: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token −min(ratio·A, clip(ratio, lo, hi)·A_clip), dual-clipped at −c·A_clip for A < 0.

    ratio/advantages/adv_clip/mask [B, T]. keep_grad (GPPO): the clipped values keep gradient weight
    lo / hi / c (bound·ratio/sg(ratio)) instead of 0. Returns (loss [B, T], {clipfrac, clipfrac_lower}).
    """
    _check_c(clip_ratio_c)
    l1 = -advantages * ratio
    if keep_grad:
        x_sg = ratio.detach() if ratio_sg is None else ratio_sg
        clipped = _clip_keep_grad(ratio, lo, hi, x_sg)
    else:
        clipped = torch.clamp(ratio, lo, hi)
    l2 = -adv_clip * clipped
    loss = torch.maximum(l1, l2)
    m = response_mask.bool()
    metrics = {"clipfrac": masked_mean((l2 > l1).to(ratio.dtype), m).detach()}
    if clip_ratio_c is not None:
        if keep_grad:
            l3 = -adv_clip * clip_ratio_c * (ratio / (ratio.detach() if ratio_sg is None else ratio_sg))
        else:
            l3 = -adv_clip * clip_ratio_c
        neg = advantages < 0
        metrics["clipfrac_lower"] = masked_mean(((loss > l3) & neg).to(ratio.dtype), m).detach()
        loss = torch.where(neg, torch.minimum(loss, l3), loss)
    return _masked(loss, m), metrics


def _ppo_kl(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    return masked_mean((old_logp - logp).detach(), mask)


# ------------------------------------------------------------------------------------------------ losses
@register_policy_loss("ppo")
def ppo_loss(
    logp, old_logp, advantages, response_mask, *, log_roff=None, loss_form="faithful", clip_ratio_low=0.2,
    clip_ratio_high=0.2, clip_ratio_c=None, **_,
):
    """Vanilla PPO clip (DAPO clip-higher via clip_ratio_low ≠ clip_ratio_high; dual-clip via clip_ratio_c):
    L = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A); for A < 0, L = min(L, −c·A)."""
    logp, old_logp, advantages, _ = _clean(response_mask, logp, old_logp, advantages)
    r, adv_c, w_roff = _roff(log_roff, loss_form, advantages)
    ratio = _times_r(torch.exp(_log_ratio(logp, old_logp)), r)
    loss, met = clipped_surrogate(ratio, advantages, adv_c, response_mask, lo=1 - clip_ratio_low, hi=1 + clip_ratio_high, clip_ratio_c=clip_ratio_c)
    met["ppo_kl"] = _ppo_kl(logp, old_logp, response_mask)
    return _times_r(loss, w_roff), met


@register_policy_loss("raft_pp")
def raft_pp_loss(
    logp, old_logp, advantages, response_mask, *, log_roff=None, loss_form="faithful", clip_ratio_low=0.2,
    clip_ratio_high=0.2, clip_ratio_c=None, keep_mask=None, **_,
):
    """RAFT++: `ppo` restricted to kept samples (keep_mask [B] bool; default all rows — with the `raft`
    estimator the advantage is already 1 on kept and 0 on dropped samples)."""
    mask = response_mask.bool()
    if keep_mask is not None:
        mask = mask & keep_mask.bool().unsqueeze(-1)
    return ppo_loss(
        logp, old_logp, advantages, mask, log_roff=log_roff, loss_form=loss_form, clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c,
    )


@register_policy_loss("gspo")
def gspo_loss(
    logp, old_logp, advantages, response_mask, *, log_roff=None, loss_form="faithful", clip_ratio_low=3e-4,
    clip_ratio_high=4e-4, clip_ratio_c=None, logp_sg=None, **_,
):
    """GSPO (token form): s_i = exp(mean_t(logp − old_logp)) over the response's valid tokens,
    s_i,t = sg(s_i)·exp(logp_t − sg(logp_t)) (value s_i, gradient s_i ∇logp_t); L = −min(sA, clip(s)A).
    The per-token loss's Jacobian is intentionally the GSPO-token one: aggregated with seq-mean-token-mean
    and a per-sequence advantage it equals the sequence-level GSPO gradient."""
    logp, old_logp, advantages, logp_sg = _clean(response_mask, logp, old_logp, advantages, logp_sg)
    m = response_mask.bool()
    sg = _sg(logp, logp_sg)
    n = m.sum(-1, keepdim=True).clamp(min=1).to(logp.dtype)
    seq_lr = torch.clamp(masked_sum(sg - old_logp, m, dim=-1).unsqueeze(-1) / n, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    r, adv_c, w_roff = _roff(log_roff, loss_form, advantages)
    s_tok = _times_r(torch.exp(seq_lr + logp - sg), r)
    loss, met = clipped_surrogate(s_tok, advantages, adv_c, m, lo=1 - clip_ratio_low, hi=1 + clip_ratio_high, clip_ratio_c=clip_ratio_c)
    met["ppo_kl"] = _ppo_kl(logp, old_logp, m)
    return _times_r(loss, w_roff), met


@register_policy_loss("gppo")
def gppo_loss(
    logp, old_logp, advantages, response_mask, *, log_roff=None, loss_form="faithful", clip_ratio_low=0.2,
    clip_ratio_high=0.2, clip_ratio_c=None, logp_sg=None, **_,
):
    """GPPO (gradient-preserving clip): forward value of `ppo`; gradient weight on ∇logp is 1−ε_low where
    ρ < 1−ε_low and A < 0, 1+ε_high where ρ > 1+ε_high and A > 0, ρ otherwise (c for dual-clipped tokens)."""
    logp, old_logp, advantages, logp_sg = _clean(response_mask, logp, old_logp, advantages, logp_sg)
    r, adv_c, w_roff = _roff(log_roff, loss_form, advantages)
    ratio = _times_r(torch.exp(_log_ratio(logp, old_logp)), r)
    ratio_sg = _times_r(torch.exp(_log_ratio(_sg(logp, logp_sg), old_logp)), r)
    loss, met = clipped_surrogate(
        ratio, advantages, adv_c, response_mask, lo=1 - clip_ratio_low, hi=1 + clip_ratio_high,
        clip_ratio_c=clip_ratio_c, keep_grad=True, ratio_sg=ratio_sg,
    )
    met["ppo_kl"] = _ppo_kl(logp, old_logp, response_mask)
    return _times_r(loss, w_roff), met


@register_policy_loss("cispo")
def cispo_loss(
    logp, old_logp, advantages, response_mask, *, log_roff=None, loss_form="faithful", clip_ratio_low=0.2,
    clip_ratio_high=0.2, logp_sg=None, **_,
):
    """CISPO: L = −sg(clip(ρ, 1−ε_low, 1+ε_high))·A·logp_t (gradient = −clip(ρ)·A·∇logp for every token)."""
    logp, old_logp, advantages, logp_sg = _clean(response_mask, logp, old_logp, advantages, logp_sg)
    r, adv_c, w_roff = _roff(log_roff, loss_form, advantages)
    ratio_sg = _times_r(torch.exp(_log_ratio(_sg(logp, logp_sg), old_logp)), r)
    w = torch.clamp(ratio_sg, 1 - clip_ratio_low, 1 + clip_ratio_high).detach()
    loss = -w * adv_c * logp
    m = response_mask.bool()
    met = {
        "clipfrac": masked_mean((w != ratio_sg).to(logp.dtype), m).detach(),
        "ppo_kl": _ppo_kl(logp, old_logp, m),
    }
    return _times_r(_masked(loss, m), w_roff), met


@register_policy_loss("aspo")
def aspo_loss(
    logp, old_logp, advantages, response_mask, *, log_roff=None, loss_form="faithful", clip_ratio_low=0.2,
    clip_ratio_high=0.2, clip_ratio_c=None, logp_sg=None, **_,
):
    """ASPO (asymmetric IS). A < 0: weight w = clip(ρ, min=1−ε_low) — tokens with ρ < 1−ε_low get a constant
    value (no gradient); L = −A·w. A > 0: ρ̃ = clip(ρ, max=1+ε_high) (tokens above are likewise frozen) and the
    IS weight is flipped: w = ρ̂ = π_old·π_θ/sg(π_θ²), value 1/ρ̃, gradient (1/ρ̃)∇logp; L = −A·w.
    A = 0 behaves as A > 0 with zero loss. Soft dual clip (CISPO-style, when clip_ratio_c is set): where the
    weight's value exceeds c, L = −A·sg(c)·logp_t (gradient c·A·∇logp kept)."""
    logp, old_logp, advantages, logp_sg = _clean(response_mask, logp, old_logp, advantages, logp_sg)
    _check_c(clip_ratio_c)
    r, adv_c, w_roff = _roff(log_roff, loss_form, advantages)
    ratio = _times_r(torch.exp(_log_ratio(logp, old_logp)), r)
    ratio_sg = _times_r(torch.exp(_log_ratio(_sg(logp, logp_sg), old_logp)), r)
    pos = advantages >= 0
    lo, hi = 1 - clip_ratio_low, 1 + clip_ratio_high
    frozen = (pos & (ratio_sg > hi)) | (~pos & (ratio_sg < lo))
    one = ratio / ratio_sg  # value 1, gradient ∇logp
    neg_w = torch.where(frozen, torch.full_like(ratio_sg, lo), ratio)
    pos_sg = torch.where(frozen, torch.full_like(ratio_sg, hi), ratio_sg)
    pos_w = torch.where(frozen, 1.0 / pos_sg, one / ratio_sg)
    w = torch.where(pos, pos_w, neg_w)
    w_val = torch.where(pos, 1.0 / pos_sg, torch.where(frozen, torch.full_like(ratio_sg, lo), ratio_sg))
    loss = -adv_c * w
    m = response_mask.bool()
    met = {"clipfrac": masked_mean(frozen.to(logp.dtype), m).detach(), "ppo_kl": _ppo_kl(logp, old_logp, m)}
    if clip_ratio_c is not None:
        dual = (w_val > clip_ratio_c) & ~frozen
        loss = torch.where(dual, -adv_c * clip_ratio_c * logp, loss)
        met["clipfrac_dual"] = masked_mean(dual.to(logp.dtype), m).detach()
    return _times_r(_masked(loss, m), w_roff), met


@register_policy_loss("ecpo")
def ecpo_loss(
    logp, old_logp, advantages, response_mask, *, log_roff=None, loss_form="faithful", clip_ratio_low=0.2,
    clip_ratio_high=0.2, clip_ratio_c=None, ecpo_delta=0.1, logp_sg=None, **_,
):
    """ECPO: `ppo` with π_old replaced by max(sg(π_θ)/(1+ε_high+δ), π_old) (δ = ecpo_delta > 0), i.e. the
    ratio's value is capped at 1+ε_high+δ while its gradient is kept (weight 1+ε_high+δ beyond the cap)."""
    logp, old_logp, advantages, logp_sg = _clean(response_mask, logp, old_logp, advantages, logp_sg)
    if not ecpo_delta > 0:
        raise ValueError(f"ecpo_delta: must be > 0 (got {ecpo_delta})")
    r, adv_c, w_roff = _roff(log_roff, loss_form, advantages)
    denom = torch.maximum(_sg(logp, logp_sg) - math.log(1 + clip_ratio_high + ecpo_delta), old_logp)
    ratio = _times_r(torch.exp(_log_ratio(logp, denom)), r)
    loss, met = clipped_surrogate(ratio, advantages, adv_c, response_mask, lo=1 - clip_ratio_low, hi=1 + clip_ratio_high, clip_ratio_c=clip_ratio_c)
    met["ppo_kl"] = _ppo_kl(logp, old_logp, response_mask)
    met["ecpo_capfrac"] = masked_mean((denom != old_logp).to(logp.dtype), response_mask).detach()
    return _times_r(loss, w_roff), met


def bapo_candidate_sums(
    ratio: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    bapo_a_low: float = 0.6,
    bapo_a_high: float = 1.2,
    bapo_b_low: float = 0.9,
    bapo_b_high: float = 3.0,
    bapo_delta_high: float = 0.05,
    bapo_delta_low: float = 0.02,
    **_,
) -> tuple[list[tuple[float, float]], Tensor, Tensor]:
    """BAPO candidate bounds in search order and, for each, the positive / negative contributions P, N [K]
    (float64) of this batch. P and N are sums: add them over micro-batches / all-reduce them over DP ranks, then
    `bapo_pick` gives bounds that do not depend on the split. ratio/advantages/mask [B, T] (detached)."""
    if bapo_b_low < bapo_a_low or bapo_b_high < bapo_a_high:
        raise ValueError(
            f"bapo bounds: need bapo_a_low ≤ bapo_b_low and bapo_a_high ≤ bapo_b_high (bounds are raised from a to b), "
            f"got a_low={bapo_a_low}, b_low={bapo_b_low}, a_high={bapo_a_high}, b_high={bapo_b_high}; paper: 0.6→0.9, 1.2→3.0"
        )
    highs = [min(bapo_a_high + k * bapo_delta_high, bapo_b_high) for k in range(_steps(bapo_a_high, bapo_b_high, bapo_delta_high) + 1)]
    lows = [min(bapo_a_low + k * bapo_delta_low, bapo_b_low) for k in range(_steps(bapo_a_low, bapo_b_low, bapo_delta_low) + 1)]
    m = response_mask.bool()
    x = ratio.detach().to(torch.float64)[m]
    a = advantages.detach().to(torch.float64)[m]
    contrib = x * a.abs()
    dev = x.device
    # P(c_high) for every candidate c_high at once: a positive token counts for every c_high ≥ its ratio
    h = torch.tensor(highs, dtype=torch.float64, device=dev)
    pos = a > 0
    ih = torch.bucketize(x[pos], h, right=False)  # first candidate index with h ≥ x (len(h) = none)
    p_all = torch.zeros(len(highs) + 1, dtype=torch.float64, device=dev).index_add_(0, ih, contrib[pos]).cumsum(0)[:-1]
    # N(c_low) for every candidate c_low: a negative token counts for every c_low ≤ its ratio
    lo_t = torch.tensor(lows, dtype=torch.float64, device=dev)
    neg = a < 0
    il = torch.bucketize(x[neg], lo_t, right=True)  # number of candidates with c_low ≤ x
    bins = torch.zeros(len(lows) + 1, dtype=torch.float64, device=dev).index_add_(0, il, contrib[neg])
    n_all = bins.flip(0).cumsum(0).flip(0)[1:]  # n_all[k] = Σ over tokens with il > k
    # candidate order: (a⁻, h_0..h_K) then (l_1..l_L, b⁺)
    p = torch.cat([p_all, p_all[-1:].expand(len(lows) - 1)])
    n = torch.cat([n_all[:1].expand(len(highs)), n_all[1:]])
    cands = [(lows[0], hh) for hh in highs] + [(ll, highs[-1]) for ll in lows[1:]]
    return cands, p, n


def bapo_pick(cands: list[tuple[float, float]], p: Tensor, n: Tensor, bapo_rho0: float) -> tuple[float, float, float]:
    """First candidate whose positive share P/(P+N) (1 when P+N = 0) reaches ρ₀, else the last:
    (c_low, c_high, share)."""
    share = torch.where(p + n > 0, p / (p + n).clamp(min=1e-300), torch.ones_like(p))
    ok = (share >= bapo_rho0).nonzero()
    i = int(ok[0]) if ok.numel() else len(cands) - 1
    return cands[i][0], cands[i][1], float(share[i])


def bapo_bounds(ratio: Tensor, advantages: Tensor, response_mask: Tensor, *, bapo_rho0: float = 0.4, **kw) -> tuple[float, float, float]:
    """BAPO adaptive bounds (c_low, c_high, positive share) for ratio/advantages/mask [B, T] (detached).

    Positive share ρ_pos(c_low, c_high) = P / (P + N), P = Σ_{A>0, ρ ≤ c_high} ρ·A, N = Σ_{A<0, ρ ≥ c_low} ρ·|A|
    (tokens whose gradient the clip does not zero); 1 when P + N = 0. Candidates in order: c_high = a⁺, a⁺+δ₁, …, b⁺
    (c_low = a⁻), then c_low = a⁻+δ₂, …, b⁻ (c_high = b⁺); the first with ρ_pos ≥ ρ₀ wins, else the last.
    Keywords: bapo_a_low, bapo_a_high, bapo_b_low, bapo_b_high, bapo_delta_high, bapo_delta_low.
    """
    cands, p, n = bapo_candidate_sums(ratio, advantages, response_mask, **kw)
    return bapo_pick(cands, p, n, bapo_rho0)


def _steps(a: float, b: float, d: float) -> int:
    if b <= a or d <= 0:
        return 0
    return int(math.ceil((b - a) / d - 1e-9))


@register_policy_loss("bapo")
def bapo_loss(
    logp, old_logp, advantages, response_mask, *, log_roff=None, loss_form="faithful", clip_ratio_c=None,
    bapo_clip_bounds: tuple[float, float] | None = None, bapo_rho0: float = 0.4, bapo_a_low: float = 0.6,
    bapo_a_high: float = 1.2, bapo_b_low: float = 0.9, bapo_b_high: float = 3.0, bapo_delta_high: float = 0.05,
    bapo_delta_low: float = 0.02, **_,
):
    """BAPO: `ppo` with ratio bounds [c_low, c_high] chosen per call by `bapo_bounds` (or given as
    bapo_clip_bounds=(c_low, c_high), e.g. computed once on the whole step batch): L = −min(ρA, clip(ρ, c_low,
    c_high)A). Metrics add bapo_c_low, bapo_c_high, bapo_pos_share."""
    logp, old_logp, advantages, _ = _clean(response_mask, logp, old_logp, advantages)
    r, adv_c, w_roff = _roff(log_roff, loss_form, advantages)
    ratio = _times_r(torch.exp(_log_ratio(logp, old_logp)), r)
    if bapo_clip_bounds is None:
        c_low, c_high, share = bapo_bounds(
            ratio, advantages, response_mask, bapo_rho0=bapo_rho0, bapo_a_low=bapo_a_low, bapo_a_high=bapo_a_high,
            bapo_b_low=bapo_b_low, bapo_b_high=bapo_b_high, bapo_delta_high=bapo_delta_high, bapo_delta_low=bapo_delta_low,
        )
    else:
        c_low, c_high = bapo_clip_bounds
        share = float("nan")
    loss, met = clipped_surrogate(ratio, advantages, adv_c, response_mask, lo=c_low, hi=c_high, clip_ratio_c=clip_ratio_c)
    met["ppo_kl"] = _ppo_kl(logp, old_logp, response_mask)
    met["bapo_c_low"] = torch.tensor(c_low, dtype=logp.dtype)
    met["bapo_c_high"] = torch.tensor(c_high, dtype=logp.dtype)
    met["bapo_pos_share"] = torch.tensor(share, dtype=logp.dtype)
    return _times_r(loss, w_roff), met


@register_policy_loss("reinforce_loss")
def reinforce_loss(logp, old_logp, advantages, response_mask, *, log_roff=None, loss_form="faithful", **_):
    """REINFORCE: L = −A·logp_t (no ratio). With R_off: −R·A'·logp_t, A' = R·A (faithful) or A (corrected)."""
    logp, old_logp, advantages, _ = _clean(response_mask, logp, old_logp, advantages)
    r, adv_c, w_roff = _roff(log_roff, loss_form, advantages)
    loss = -_times_r(adv_c, r) * logp
    m = response_mask.bool()
    return _times_r(_masked(loss, m), w_roff), {"ppo_kl": _ppo_kl(logp, old_logp, m)}
