"""RFPO off-policy weight R_off for fixed sequences: log R_off = γ·(S(o) − S(o_f)), clamped, detached.

Inputs are the actor's log-prob pass on the PLAIN prompt q (never the fix prompt):
  logp_wrong [B, Tw], mask_wrong [B, Tw]  per-token old_logp of the original wrong response o that row i's fix
                                          replaced (any values on rows that are not fixed; they are ignored)
  logp_fixed [B, Tf], mask_fixed [B, Tf]  per-token old_logp of row i's own response (o_f on fixed rows)
  is_fixed   [B] bool                     rows holding a successful fix
S = Σ_t logp (roff_mode=seq_sum) or the mean over valid tokens (seq_mean). The result log_roff [B] is 0
(R_off = 1) on unfixed rows, detached (no gradient ever reaches either log-prob tensor), clamped to
[−roff_clip, +roff_clip]. Feed it to any policy loss as `log_roff`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rfpo_megatron.config import unknown_name_message
from rfpo_megatron.algos.stats import masked_sum

ROFF_MODES = ("seq_sum", "seq_mean")


def sequence_logp(logp: Tensor, mask: Tensor, mode: str) -> Tensor:
    """S [B] from per-token logp/mask [B, T]: sum (seq_sum) or mean over valid tokens (seq_mean; 0 if empty)."""
    if mode not in ROFF_MODES:
        raise ValueError(unknown_name_message("rfpo.roff_mode", mode, ROFF_MODES))
    s = masked_sum(logp.detach().to(torch.float64), mask, dim=-1)
    if mode == "seq_mean":
        s = s / mask.bool().sum(-1).clamp(min=1).to(torch.float64)
    return s


@torch.no_grad()
def compute_log_roff(
    logp_wrong: Tensor,
    mask_wrong: Tensor,
    logp_fixed: Tensor,
    mask_fixed: Tensor,
    is_fixed: Tensor,
    *,
    mode: str = "seq_sum",
    gamma: float = 1.0,
    clip: float | None = None,
) -> Tensor:
    """log R_off [B] (dtype of logp_fixed) = clamp(γ·(S(o) − S(o_f)), −clip, clip) on fixed rows, 0 elsewhere."""
    b = is_fixed.shape[0]
    for name, t in (("logp_wrong", logp_wrong), ("mask_wrong", mask_wrong), ("logp_fixed", logp_fixed), ("mask_fixed", mask_fixed)):
        if t.dim() != 2 or t.shape[0] != b:
            raise ValueError(f"compute_log_roff: {name} must be [B={b}, T], got {tuple(t.shape)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"rfpo.roff_clip: must be > 0 or null (got {clip})")
    raw = gamma * (sequence_logp(logp_wrong, mask_wrong, mode) - sequence_logp(logp_fixed, mask_fixed, mode))
    if clip is not None:
        raw = raw.clamp(-clip, clip)
    out = torch.where(is_fixed.bool(), raw, torch.zeros_like(raw))
    return out.to(logp_fixed.dtype if logp_fixed.is_floating_point() else torch.float32).detach()
