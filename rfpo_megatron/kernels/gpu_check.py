"""Kernel steps of the one-call GPU check (`tools/gpu_check.sh`): (a) Triton kernels vs float64, (b) speed and memory.

(a) `kernel_correctness(device, dry_run)`: the Triton `vocab_parallel_logprobs` (log-probs, entropies and
    d/dlogits of Σ w₁·logp + Σ w₂·entropy, random weights) on a padded vocabulary (padded columns hold +30, so a
    kernel that read them would be visibly wrong) at temperature 0.7, fp32 and bf16 logits, and the Triton
    `fused_rfpo_token_loss` (both forms, dual clip, R_off) and `segment_sum`, each against a float64 torch
    reference computed from the same (exactly upcast) inputs. Every check reports its max error, its bound and
    `ok`; `BOUNDS` states the bounds.
(b) `kernel_speed(device, shapes, impls, ...)`: `bench._measure` per (shape, implementation): median fwd and
    fwd+bwd time, peak extra memory, max |Δlogp| vs fp32 torch; rows are handed to `record` as they finish.

Both return plain JSON-able dicts. On CPU (the dry run) the Triton path runs in the interpreter
(TRITON_INTERPRET=1) and the shapes are tiny.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

# |kernel - float64| bounds. Inputs are exact in both (bf16 upcasts exactly), so logp/entropy errors are fp32
# arithmetic only: 1e-4 absolute, far below one bf16 rounding of a logit (2^-8·|x|/T ≈ 0.02 at |x| = 4).
# Gradient element j of a row: |Δ_j| ≤ rtol·|ref_j| + grad_row_atol·max_k |ref_k| (the row term covers fp32
# cancellation in 1 - p_y and log p_j + H) + grad_atol; rtol = 2^-8 for bf16 (the stored gradient is rounded once to
# bf16: unit roundoff 2^-8) and 1e-5 for fp32.
BOUNDS = {
    "logp_abs": 1e-4,
    "entropy_abs": 1e-4,
    "grad_rtol": {"bf16": 2.0**-8, "fp32": 1e-5},
    "grad_row_atol": 1e-6,
    "grad_atol": 1e-9,  # and an absolute floor: |grad| < 1e-9 (fp32 underflow of tiny p_j) is noise
    "loss_rtol": 1e-5,  # token loss and its gradient, fp32 kernel vs float64 (smooth points only)
    "loss_atol": 1e-6,
    "segsum_abs": 1e-4,
}
_DT = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _max(x: torch.Tensor) -> float:
    return float(x.detach().max()) if x.numel() else 0.0


# --------------------------------------------------------------------------------------- float64 references
def ref_logprobs64(logits, labels, vocab, temperature, w_logp, w_ent):
    """float64 (logp [N], entropy [N], d/dlogits of Σ w_logp·logp + Σ w_ent·entropy [N, V]) over the first
    `vocab` columns (padded columns: gradient 0); labels < 0 give logp 0 and no gradient."""
    x = logits.detach().double().requires_grad_()
    lp_all = torch.log_softmax(x[:, :vocab] / temperature, dim=-1)
    keep = labels >= 0
    lp = lp_all.gather(1, labels.clamp_min(0)[:, None])[:, 0] * keep
    ent = -(lp_all.exp() * lp_all).sum(-1)
    (grad,) = torch.autograd.grad((w_logp.double() * lp).sum() + (w_ent.double() * ent).sum(), x)
    return lp.detach(), ent.detach(), grad


def ref_token_loss64(logp, old, adv, cu, log_roff, lo, hi, clip_c, form):
    """float64 per-token RFPO/PPO loss (docs/kernels.md): r = exp(clamp(logp-old, ±20))·R, R' = R (faithful)
    or 1 (corrected), L = -min(r·A, clip(r, 1-lo, 1+hi)·R'·A), dual clip L = min(L, -c·R'·A) where A < 0."""
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=logp.device), (cu[1:] - cu[:-1]).long())
    roff = torch.exp(log_roff.double())[seg]
    r = torch.exp(torch.clamp(logp - old.double(), -20.0, 20.0)) * roff
    rp = roff if form == "faithful" else torch.ones_like(roff)
    a = adv.double()
    loss = -torch.minimum(r * a, torch.clamp(r, 1 - lo, 1 + hi) * rp * a)
    if clip_c is not None:
        loss = torch.where(a < 0, torch.minimum(loss, -clip_c * rp * a), loss)
    return loss


# ------------------------------------------------------------------------------------------- (a) correctness
def check_logprobs(n: int, vocab: int, v_pad: int, dtype: str, device: str, temperature: float = 0.7,
                   inplace: bool = False, seed: int = 0) -> dict:
    """Triton log-probs/entropy/gradient on [n, v_pad] logits (true vocab `vocab`) vs float64; errors + ok."""
    from .logprob import vocab_parallel_logprobs_triton

    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, v_pad, device=device, generator=g) * 3
    logits[: max(1, n // 16)] += 1e4  # large magnitudes: differences to the row max must stay exact
    logits[:, vocab:] = 30.0  # padded columns: must be ignored (-inf), never read
    logits = logits.to(_DT[dtype])
    labels = torch.randint(0, vocab, (n,), device=device, generator=g)
    labels[1::7] = -100  # ignored rows
    w_lp = torch.randn(n, device=device, generator=g)
    w_en = torch.randn(n, device=device, generator=g)
    ref_lp, ref_en, ref_g = ref_logprobs64(logits, labels, vocab, temperature, w_lp, w_en)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1 if inplace else leaf  # in place: the backward overwrites this non-leaf copy with d/dlogits
    lp, en = vocab_parallel_logprobs_triton(x, labels, temperature=temperature, vocab_size=vocab,
                                            inplace_backward=inplace)
    (grad,) = torch.autograd.grad((w_lp * lp).sum() + (w_en * en).sum(), leaf)
    rtol, row_atol = BOUNDS["grad_rtol"][dtype], BOUNDS["grad_row_atol"]
    gerr = (grad.double() - ref_g).abs()
    bound = rtol * ref_g.abs() + row_atol * ref_g.abs().amax(1, keepdim=True) + BOUNDS["grad_atol"]
    res = {
        "n": n, "vocab": vocab, "v_padded": v_pad, "dtype": dtype, "temperature": temperature, "inplace": inplace,
        "logp_max_abs_err": _max((lp.double() - ref_lp).abs()),
        "entropy_max_abs_err": _max((en.double() - ref_en).abs()),
        "grad_max_abs_err": _max(gerr),
        "grad_ref_max_abs": _max(ref_g.abs()),
        "grad_max_err_over_bound": _max(gerr / bound),
        "grad_padded_cols_max_abs": _max(grad[:, vocab:].double().abs()),
        "finite": bool(torch.isfinite(lp).all() and torch.isfinite(en).all() and torch.isfinite(grad).all()),
        "bounds": {"logp_abs": BOUNDS["logp_abs"], "entropy_abs": BOUNDS["entropy_abs"], "grad_rtol": rtol,
                   "grad_row_atol": row_atol, "grad_atol": BOUNDS["grad_atol"]},
    }
    res["ok"] = bool(res["finite"] and res["logp_max_abs_err"] <= BOUNDS["logp_abs"]
                     and res["entropy_max_abs_err"] <= BOUNDS["entropy_abs"] and res["grad_max_err_over_bound"] <= 1
                     and res["grad_padded_cols_max_abs"] == 0)
    return res


def check_token_loss(n: int, n_seq: int, device: str, form: str, seed: int = 0) -> dict:
    """Triton token loss (value and d/dlogp) and segment_sum vs float64; gradients compared at smooth points
    (the float64 gradient is the same at logp ± 1e-4: no clip/min branch switch nearby)."""
    from .loss import fused_rfpo_token_loss_triton, segment_sum_triton

    g = torch.Generator(device=device).manual_seed(seed)
    cuts = torch.randperm(n - 1, generator=g, device=device)[: n_seq - 1].sort().values + 1
    cu = torch.cat([torch.zeros(1, dtype=torch.long, device=device), cuts,
                    torch.full((1,), n, dtype=torch.long, device=device)]).to(torch.int32)
    logp = -torch.rand(n, device=device, generator=g) * 5
    old = logp + 0.3 * torch.randn(n, device=device, generator=g)
    adv = torch.randn(n, device=device, generator=g)
    log_roff = torch.where(torch.rand(n_seq, device=device, generator=g) < 0.3,
                           0.5 * torch.randn(n_seq, device=device, generator=g), torch.zeros(n_seq, device=device))
    lo, hi, c = 0.2, 0.28, 3.0
    x = logp.clone().requires_grad_()
    loss, _ = fused_rfpo_token_loss_triton(x, old, adv, cu, log_roff, lo, hi, c, form)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    x64 = logp.double().requires_grad_()
    ref = ref_token_loss64(x64, old, adv, cu, log_roff, lo, hi, c, form)
    (ref_g,) = torch.autograd.grad(ref.sum(), x64)
    grads_near = []
    for d in (-1e-4, 1e-4):
        y = (logp.double() + d).requires_grad_()
        grads_near.append(torch.autograd.grad(ref_token_loss64(y, old, adv, cu, log_roff, lo, hi, c, form).sum(), y)[0])
    smooth = ((grads_near[0] - ref_g).abs() <= 1e-3 * (ref_g.abs() + 1e-6)) & \
             ((grads_near[1] - ref_g).abs() <= 1e-3 * (ref_g.abs() + 1e-6))
    rtol, atol = BOUNDS["loss_rtol"], BOUNDS["loss_atol"]
    lerr = (loss.double() - ref.detach()).abs() / (rtol * ref.detach().abs() + atol)
    gerr = ((grad.double() - ref_g).abs() / (rtol * ref_g.abs() + atol))[smooth]
    seg = segment_sum_triton(logp, cu)
    seg_ref = torch.stack([logp[int(a):int(b)].double().sum() for a, b in zip(cu[:-1], cu[1:])])
    res = {
        "n": n, "n_seq": n_seq, "form": form, "clip": [lo, hi, c],
        "loss_max_abs_err": _max((loss.double() - ref.detach()).abs()), "loss_max_err_over_bound": _max(lerr),
        "grad_max_abs_err": _max((grad.double() - ref_g).abs()[smooth]), "grad_max_err_over_bound": _max(gerr),
        "grad_points_near_a_branch_switch": int((~smooth).sum()),
        "segsum_max_abs_err": _max((seg.double() - seg_ref).abs()),
        "bounds": {"rtol": rtol, "atol": atol, "segsum_abs": BOUNDS["segsum_abs"]},
    }
    res["ok"] = bool(res["loss_max_err_over_bound"] <= 1 and res["grad_max_err_over_bound"] <= 1
                     and res["segsum_max_abs_err"] <= BOUNDS["segsum_abs"] and int(smooth.sum()) >= n // 2)
    return res


def kernel_correctness(device: str, dry_run: bool) -> dict:
    """Step (a): every check above at the step's shapes; {"checks": [...], "ok": all ok}."""
    if dry_run:
        n, vocab, v_pad, n_loss, n_seq = 48, 600, 640, 300, 7
    else:  # Qwen2.5 vocabulary padded to 128·tp (tp = 4: 152064)
        n, vocab, v_pad, n_loss, n_seq = 2048, 151936, 152064, 65536, 97
    checks = [dict(kind="logprobs", **check_logprobs(n, vocab, v_pad, dt, device, seed=i))
              for i, dt in enumerate(("fp32", "bf16"))]
    checks.append(dict(kind="logprobs", **check_logprobs(n, vocab, v_pad, "bf16", device, inplace=True, seed=2)))
    for i, form in enumerate(("faithful", "corrected")):
        checks.append(dict(kind="token_loss", **check_token_loss(n_loss, n_seq, device, form, seed=3 + i)))
    return {"checks": checks, "ok": all(c["ok"] for c in checks)}


# ------------------------------------------------------------------------------------------------ (b) speed
def kernel_speed(device: str, shapes: list[tuple[int, int]], impls: list[str], warmup: int, rep: int,
                 record: Callable[[dict], None] | None = None) -> dict:
    """Step (b): bench._measure for every impl x (N, V), implementation-major (so the first impls' rows exist at
    every shape even if a later one is slow); an implementation that raises is a row with its error."""
    from . import bench

    rows = []
    for impl in impls:
        for n, v in shapes:
            try:
                r = dataclasses.asdict(bench._measure(impl, n, v, device, warmup, rep))
            except Exception as e:  # noqa: BLE001 - one failing implementation must not end the step
                r = dataclasses.asdict(bench.Result(impl, n, v, note=f"error: {type(e).__name__}: {e}"[:300]))
            rows.append(r)
            if record:
                record({"rows": rows})
    return {"rows": rows}
