"""Triton kernels for the RFPO token loss over packed sequences and for per-sequence segment sums.

One program per sequence s streams its tokens [cu[s], cu[s+1]) in BLOCK tiles. Per token (fp32; fp64 when
logp is fp64; clip bounds are compile-time constants):
  R = exp(log_roff[s]),  r = exp(clamp(logp - old_logp, ±20))·R,  R' = R (faithful) or 1 (corrected)
  L1 = -A·r,  L2 = -clip(r, 1-eps_low, 1+eps_high)·R'·A,  L = max(L1, L2)
  dual clip (c set and A < 0): L = min(L, -c·R'·A)  (bound on the clipped branch's advantage R'·A)
  weighted form (WEIGHTED): r = ρ and R' = 1 in the above, then L ← R·L (R a per-sequence loss weight)
  per-token weights (HAS_W, e.g. TIS): L ← w_t·L
The kernel also writes dL/dlogp (ties split equally, like torch.maximum/minimum; the clamp passes the
gradient on its closed interval, like torch.clamp) and a bit field of clip flags:
  1 = clipped branch strictly larger (L2 > L1), 2 = r < 1-eps_low, 4 = r > 1+eps_high, 8 = dual clip active.
"""
from __future__ import annotations

import torch
import triton.language as tl

# Reductions go through tl.reduce with triton's own combine functions (what tl.max / tl.sum do for fp32)
# and tiles are built with tl.full, not the @jit helpers tl.max/tl.sum/tl.zeros: those helpers are frozen
# as compiled-only JIT functions when triton was imported before TRITON_INTERPRET=1 was set, which would
# break the interpreter; builtins and these combine functions work in both modes whatever the import order.
_MAX = tl.standard._elementwise_max
_ADD = tl.standard._sum_combine

from .dispatch import jit

BLOCK = 128
GPU_OPTS = {"enable_fp_fusion": True}  # explicit (triton 3.9 warns on the default, which changes in 3.10)
LOG_RATIO_CLAMP = 20.0  # logp - old_logp is clamped to ±20 before exp (as the algos registry does)


def _loss_kernel(
    logp_ptr, old_ptr, adv_ptr, cu_ptr, lroff_ptr, w_ptr,
    loss_ptr, coef_ptr, ratio_ptr, flag_ptr,
    lo: tl.constexpr, hi: tl.constexpr, clip_c: tl.constexpr, CDT: tl.constexpr,
    FAITHFUL: tl.constexpr, WEIGHTED: tl.constexpr, HAS_W: tl.constexpr, DUAL: tl.constexpr,
    BLOCK: tl.constexpr, LOG_RATIO_CLAMP: tl.constexpr,
):
    seg = tl.program_id(0)
    start = tl.load(cu_ptr + seg).to(tl.int64)
    end = tl.load(cu_ptr + seg + 1).to(tl.int64)
    lr = tl.load(lroff_ptr + seg).to(CDT)
    R = tl.exp(lr)
    offs = tl.arange(0, BLOCK)
    for t0 in range(start, end, BLOCK):
        idx = t0 + offs
        msk = idx < end
        lp = tl.load(logp_ptr + idx, mask=msk, other=0.0).to(CDT)
        old = tl.load(old_ptr + idx, mask=msk, other=0.0).to(CDT)
        A = tl.load(adv_ptr + idx, mask=msk, other=0.0).to(CDT)
        lr_tok = lp - old
        lr_in = (lr_tok >= -LOG_RATIO_CLAMP) & (lr_tok <= LOG_RATIO_CLAMP)
        if WEIGHTED:
            r = tl.exp(tl.minimum(tl.maximum(lr_tok, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP))
        else:
            r = tl.exp(tl.minimum(tl.maximum(lr_tok, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)) * R
        if FAITHFUL:
            Rp = R
        else:
            Rp = 1.0
        l1 = -A * r
        rc = tl.minimum(tl.maximum(r, lo), hi)
        l2 = -rc * Rp * A
        g1 = -A * r
        in_rng = (r >= lo) & (r <= hi)
        g2 = tl.where(in_rng, -Rp * A * r, 0.0)
        loss = tl.maximum(l1, l2)
        coef = tl.where(l1 > l2, g1, tl.where(l2 > l1, g2, 0.5 * (g1 + g2)))
        flags = tl.where(l2 > l1, 1, 0) + tl.where(r < lo, 2, 0) + tl.where(r > hi, 4, 0)
        if DUAL:
            l3 = -clip_c * Rp * A
            neg = A < 0
            coef = tl.where(neg & (l3 < loss), 0.0, tl.where(neg & (l3 == loss), 0.5 * coef, coef))
            flags = flags + tl.where(neg & (l3 < loss), 8, 0)
            loss = tl.where(neg, tl.minimum(loss, l3), loss)
        coef = tl.where(lr_in, coef, 0.0)
        if WEIGHTED:
            loss = loss * R
            coef = coef * R
        if HAS_W:
            w = tl.load(w_ptr + idx, mask=msk, other=0.0).to(CDT)
            loss = loss * w
            coef = coef * w
        tl.store(loss_ptr + idx, loss, mask=msk)
        tl.store(coef_ptr + idx, coef, mask=msk)
        tl.store(ratio_ptr + idx, r, mask=msk)
        tl.store(flag_ptr + idx, flags.to(tl.int8), mask=msk)


def _segsum_kernel(x_ptr, cu_ptr, out_ptr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(cu_ptr + seg).to(tl.int64)
    end = tl.load(cu_ptr + seg + 1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.full((BLOCK,), 0.0, CDT)
    for t0 in range(start, end, BLOCK):
        idx = t0 + offs
        acc += tl.load(x_ptr + idx, mask=idx < end, other=0.0).to(CDT)
    tl.store(out_ptr + seg, tl.reduce(acc, 0, _ADD))


def token_loss(logp, old_logp, adv, cu, log_roff, lo, hi, clip_c, form, weights=None):
    """Launch the loss kernel; returns (loss, coef, ratio) [N] (fp64 if logp is fp64, else fp32), flags [N] int8.
    form: faithful | corrected | weighted; weights: optional per-token [N] loss weights (TIS)."""
    n = logp.shape[0]
    cdt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=cdt, device=logp.device)
    coef, ratio = torch.empty_like(loss), torch.empty_like(loss)
    flags = torch.zeros(n, dtype=torch.int8, device=logp.device)
    n_seg = cu.shape[0] - 1
    if n > 0 and n_seg > 0:
        jit(_loss_kernel)[(n_seg,)](
            logp, old_logp, adv, cu, log_roff, logp if weights is None else weights, loss, coef, ratio, flags,
            lo=float(lo), hi=float(hi), clip_c=float(clip_c or 0.0),
            CDT=tl.float64 if cdt == torch.float64 else tl.float32, FAITHFUL=form == "faithful",
            WEIGHTED=form == "weighted", HAS_W=weights is not None, DUAL=clip_c is not None, BLOCK=BLOCK,
            LOG_RATIO_CLAMP=LOG_RATIO_CLAMP,
            **GPU_OPTS if logp.is_cuda else {},
        )
    return loss, coef, ratio, flags


def segment_sum(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Sum of x [N] over each segment of cu [S+1] -> [S] (fp64 for fp64 x, else fp32)."""
    n_seg = cu.shape[0] - 1
    f64 = x.dtype == torch.float64
    out = torch.zeros(max(n_seg, 0), dtype=torch.float64 if f64 else torch.float32, device=x.device)
    if n_seg > 0 and x.shape[0] > 0:
        jit(_segsum_kernel)[(n_seg,)](x, cu, out, CDT=tl.float64 if f64 else tl.float32, BLOCK=BLOCK,
                                      **GPU_OPTS if x.is_cuda else {})
    return out
