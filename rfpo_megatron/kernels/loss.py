"""Fused RFPO/PPO token loss over packed sequences (ratios, per-sequence R_off, clipped surrogate) and segment sums.

`fused_rfpo_token_loss(logp [N], old_logp [N], advantages [N], cu_seqlens [S+1], log_roff [S], clip_low,
clip_high, clip_c=None, form="faithful", weights=None) -> (loss [N] fp32, stats)`: per token t of sequence s,
with ρ = exp(clamp(logp − old_logp, ±20)), R = exp(log_roff[s]) (R_off; log_roff 0 → unfixed), r = ρ·R, and
R' = R (faithful) or 1 (corrected):

  L = −min(r·A, clip(r, 1−ε_low, 1+ε_high)·R'·A)
  dual clip (clip_c = c > 1): for A < 0, L = min(L, −c·R'·A)
  weighted: r = ρ, R' = 1 above, then L ← R·L (R_off a bounded sequence weight; the clip acts on ρ)
  weights [N] (optional, e.g. TIS): L ← w_t·L (constants)

(algorithms.md, RFPO step 5, with the conventions of the algos registry's `ppo`: the dual-clip bound uses the
clipped branch's advantage; with log_roff ≡ 0 both forms are the vanilla `ppo` loss.) Only `logp` gets a
gradient; old_logp, advantages and log_roff are treated as constants (R_off is detached by definition).
The result is the unaggregated per-token loss: masking and `loss_agg_mode` are the caller's.

`segment_sum(x [N], cu_seqlens [S+1]) -> [S]` sums x over each packed sequence (differentiable), e.g. Σ_t logp
for R_off (seq_sum) or GSPO.

Backends as in `dispatch.py`: Triton on CUDA, torch twin elsewhere, interpreter on RFPO_KERNEL_BACKEND=triton.
"""
from __future__ import annotations

import torch

from .dispatch import use_triton

FORMS = ("faithful", "corrected", "weighted")
LOG_RATIO_CLAMP = 20.0  # same constant as loss_triton and the algos registry


def _check_cu(cu_seqlens: torch.Tensor, n: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be an int [S+1] tensor of cumulative lengths starting at 0, got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if not cu_seqlens.is_cuda:  # a device sync on GPU: checked on CPU only
        c = cu_seqlens
        if int(c[0]) != 0 or int(c[-1]) != n or bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at N={n}; got "
                             f"{c.tolist()[:8]}{'...' if c.numel() > 8 else ''}")


def _check(logp, old_logp, advantages, cu_seqlens, log_roff, clip_low, clip_high, clip_c, form, weights=None):
    n = logp.shape[0] if logp.dim() == 1 else -1
    devs = {t.device for t in (logp, old_logp, advantages, cu_seqlens, log_roff)}
    if len(devs) > 1:
        raise ValueError(f"logp, old_logp, advantages, cu_seqlens and log_roff must be on one device, got {sorted(map(str, devs))}")
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must be 1-D [N] with N = len(logp) = {n}, got shape {tuple(t.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be an int [S+1] tensor of cumulative lengths starting at 0, got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    _check_cu(cu_seqlens, n)
    if weights is not None and (weights.shape != (n,) or weights.device != logp.device):
        raise ValueError(f"weights must be [N]={n} on {logp.device}, got {tuple(weights.shape)} on {weights.device}")
    if log_roff.shape != (cu_seqlens.shape[0] - 1,):
        raise ValueError(f"log_roff must be [S]={cu_seqlens.shape[0] - 1} (one per sequence), got {tuple(log_roff.shape)}")
    if form not in FORMS:
        raise ValueError(f"form={form!r} must be one of {FORMS} (config: rfpo_loss_form)")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"clip_low={clip_low} must be in [0, 1) and clip_high={clip_high} >= 0 (clip_ratio_low/high)")
    if clip_c is not None and not clip_c > 1:
        raise ValueError(f"clip_c={clip_c} must be > 1 (dual-clip constant clip_ratio_c) or None")


def _torch_token_loss(logp, old_logp, adv, cu, log_roff, lo, hi, clip_c, form, weights=None):
    """Torch twin of the loss kernel: same outputs (loss, coef, ratio fp32 [N], flags int8 [N])."""
    lens = (cu[1:] - cu[:-1]).long()
    cdt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    lr_tok = torch.repeat_interleave(log_roff.to(cdt), lens, output_size=logp.shape[0])
    R = torch.exp(lr_tok)
    A = adv.to(cdt)
    log_ratio = logp.to(cdt) - old_logp.to(cdt)
    weighted = form == "weighted"
    r = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    if not weighted:
        r = r * R
    Rp = R if form == "faithful" else torch.ones_like(R)
    l1 = -A * r
    l2 = -r.clamp(lo, hi) * Rp * A
    g1 = -A * r
    g2 = torch.where((r >= lo) & (r <= hi), -Rp * A * r, torch.zeros_like(r))
    loss = torch.maximum(l1, l2)
    coef = torch.where(l1 > l2, g1, torch.where(l2 > l1, g2, 0.5 * (g1 + g2)))
    flags = (l2 > l1).to(torch.int8) + 2 * (r < lo).to(torch.int8) + 4 * (r > hi).to(torch.int8)
    if clip_c is not None:
        l3 = -clip_c * Rp * A
        neg = A < 0
        coef = torch.where(neg & (l3 < loss), torch.zeros_like(coef), torch.where(neg & (l3 == loss), 0.5 * coef, coef))
        flags = flags + 8 * (neg & (l3 < loss)).to(torch.int8)
        loss = torch.where(neg, torch.minimum(loss, l3), loss)
    coef = torch.where(log_ratio.abs() <= LOG_RATIO_CLAMP, coef, torch.zeros_like(coef))
    if weighted:
        loss, coef = loss * R, coef * R
    if weights is not None:
        w = weights.to(cdt)
        loss, coef = loss * w, coef * w
    return loss, coef, r, flags


def _torch_segment_sum(x, cu):
    n_seg = cu.shape[0] - 1
    lens = (cu[1:] - cu[:-1]).long()
    seg_id = torch.repeat_interleave(torch.arange(n_seg, device=x.device), lens, output_size=x.shape[0])
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.zeros(n_seg, dtype=cdt, device=x.device).index_add_(0, seg_id, x.to(cdt))


class _TokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, adv, cu, log_roff, lo, hi, clip_c, form, triton_path, weights):
        args = (logp.contiguous(), old_logp.contiguous(), adv.contiguous(), cu.contiguous(), log_roff.contiguous())
        if triton_path:
            from .loss_triton import token_loss
        else:
            token_loss = _torch_token_loss
        w = None if weights is None else weights.detach().contiguous()
        loss, coef, ratio, flags = token_loss(*args, lo, hi, clip_c, form, w)
        ctx.save_for_backward(coef)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(ratio, flags)
        return loss, ratio, flags

    @staticmethod
    def backward(ctx, g_loss, _g_ratio, _g_flags):
        (coef,) = ctx.saved_tensors
        g = None if g_loss is None else (g_loss.to(coef.dtype) * coef).to(ctx.logp_dtype)
        return g, None, None, None, None, None, None, None, None, None, None


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cu, triton_path):
        cu = cu.contiguous()
        if triton_path:
            from .loss_triton import segment_sum as seg
        else:
            seg = _torch_segment_sum
        ctx.save_for_backward(cu)
        ctx.meta = (x.shape[0], x.dtype)
        return seg(x.contiguous(), cu)

    @staticmethod
    def backward(ctx, g):
        (cu,) = ctx.saved_tensors
        n, dtype = ctx.meta
        lens = (cu[1:] - cu[:-1]).long()
        return torch.repeat_interleave(g, lens, output_size=n).to(dtype), None, None


def _decode(ratio: torch.Tensor, flags: torch.Tensor) -> dict[str, torch.Tensor]:
    f = flags.to(torch.int16)
    return {
        "ratio": ratio,  # r = ρ·R_off [N] fp32
        "clipped": (f & 1) > 0,  # clipped branch strictly larger (verl's pg_clipfrac)
        "clipped_low": ((f & 1) > 0) & ((f & 2) > 0),  # ... and r < 1 − ε_low
        "clipped_high": ((f & 1) > 0) & ((f & 4) > 0),  # ... and r > 1 + ε_high
        "dual_clipped": (f & 8) > 0,  # A < 0 and −c·A below the PPO loss (verl's pg_clipfrac_lower)
    }


def _loss_impl(logp, old_logp, advantages, cu_seqlens, log_roff, clip_low, clip_high, clip_c, form, triton_path,
               weights=None):
    _check(logp, old_logp, advantages, cu_seqlens, log_roff, clip_low, clip_high, clip_c, form, weights)
    lo, hi = 1.0 - float(clip_low), 1.0 + float(clip_high)
    loss, ratio, flags = _TokenLoss.apply(
        logp, old_logp.detach(), advantages.detach(), cu_seqlens, log_roff.detach(), lo, hi,
        None if clip_c is None else float(clip_c), form, triton_path, weights,
    )
    return loss, _decode(ratio, flags)


def fused_rfpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                          cu_seqlens: torch.Tensor, log_roff: torch.Tensor, clip_low: float, clip_high: float,
                          clip_c: float | None = None, form: str = "faithful", weights: torch.Tensor | None = None):
    """Per-token RFPO/PPO loss over packed sequences; autograd to `logp` only.

    Args:
        logp: [N] current log-probs (requires grad); old_logp, advantages: [N].
        cu_seqlens: [S+1] int cumulative sequence lengths (0, ..., N) of the packed batch.
        log_roff: [S] per-sequence log R_off (0 for unfixed sequences); detached.
        clip_low, clip_high: ε_low, ε_high (ratio clipped to [1 − ε_low, 1 + ε_high]).
        clip_c: dual-clip constant c > 1, or None for no dual clip.
        form: "faithful", "corrected" or "weighted" (algorithms.md, RFPO step 5).
        weights: optional [N] per-token loss weights (TIS), constants.
    Returns:
        loss [N] and stats: ratio [N] (ρ·R_off) and bool [N] masks clipped, clipped_low, clipped_high,
        dual_clipped. Math and outputs are fp32, or fp64 when logp is fp64.
    """
    return _loss_impl(logp, old_logp, advantages, cu_seqlens, log_roff, clip_low, clip_high, clip_c, form,
                      use_triton(logp), weights)


def fused_rfpo_token_loss_torch(logp, old_logp, advantages, cu_seqlens, log_roff, clip_low, clip_high,
                                clip_c=None, form="faithful", weights=None):
    """Torch twin of `fused_rfpo_token_loss` (same signature and outputs)."""
    return _loss_impl(logp, old_logp, advantages, cu_seqlens, log_roff, clip_low, clip_high, clip_c, form, False,
                      weights)


def fused_rfpo_token_loss_triton(logp, old_logp, advantages, cu_seqlens, log_roff, clip_low, clip_high,
                                 clip_c=None, form="faithful", weights=None):
    """Triton path of `fused_rfpo_token_loss`, forced (CPU needs TRITON_INTERPRET=1)."""
    return _loss_impl(logp, old_logp, advantages, cu_seqlens, log_roff, clip_low, clip_high, clip_c, form, True,
                      weights)


def _segsum_impl(x, cu_seqlens, triton_path):
    if x.dim() != 1:
        raise ValueError(f"segment_sum: x must be 1-D [N], got shape {tuple(x.shape)}")
    _check_cu(cu_seqlens, x.shape[0])
    return _SegmentSum.apply(x, cu_seqlens, triton_path)


def segment_sum(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Σ of x [N] over each packed sequence of cu_seqlens [S+1] -> [S] (fp32; fp64 for fp64 x); differentiable."""
    return _segsum_impl(x, cu_seqlens, use_triton(x))


def segment_sum_torch(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Torch twin of `segment_sum`."""
    return _segsum_impl(x, cu_seqlens, False)


def segment_sum_triton(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Triton path of `segment_sum`, forced (CPU needs TRITON_INTERPRET=1)."""
    return _segsum_impl(x, cu_seqlens, True)
