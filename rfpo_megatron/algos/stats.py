"""Masked statistics and group (prompt) bookkeeping shared by the algorithm modules.

Shapes: values/mask [B, T] (mask bool or 0/1), group_ids [B] (any integer ids, not necessarily contiguous).
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Σ x over mask==1 (padding values never leak in, even if NaN/inf)."""
    z = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return z.sum() if dim is None else z.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Mean of x over mask==1; 0 when the mask is empty."""
    n = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / n.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over mask==1 (whole tensor); 0 when fewer than 2 valid entries (unbiased)."""
    n = mask.to(x.dtype).sum()
    mu = masked_mean(x, mask)
    ss = masked_sum((x - mu) ** 2, mask)
    denom = (n - 1) if unbiased else n
    return torch.where(denom > 0, ss / denom.clamp(min=1), torch.zeros_like(ss))


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / sqrt(var_unbiased + eps) over the valid entries; 0 on padding."""
    mu = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mu) * torch.rsqrt(var + eps)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids [B] to dense indices 0..G-1; returns (inverse [B] long, G)."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must have shape [B], got {tuple(group_ids.shape)}")
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(uniq.numel())


def group_stats(values: Tensor, group_ids: Tensor) -> dict[str, Tensor]:
    """Per-sample group statistics of values [B] (float64 inside).

    Returns dict of [B] tensors broadcast back to samples: count, mean, std (unbiased; 0 when count==1),
    max, min, all_equal (bool).
    """
    inv, g = group_index(group_ids)
    v = values.to(torch.float64)
    cnt = torch.zeros(g, dtype=torch.float64, device=v.device).index_add_(0, inv, torch.ones_like(v))
    s = torch.zeros(g, dtype=torch.float64, device=v.device).index_add_(0, inv, v)
    mean = s / cnt
    ss = torch.zeros(g, dtype=torch.float64, device=v.device).index_add_(0, inv, (v - mean[inv]) ** 2)
    var = torch.where(cnt > 1, ss / (cnt - 1).clamp(min=1), torch.zeros_like(ss))
    gmax = torch.full((g,), -torch.inf, dtype=torch.float64, device=v.device).scatter_reduce(0, inv, v, "amax")
    gmin = torch.full((g,), torch.inf, dtype=torch.float64, device=v.device).scatter_reduce(0, inv, v, "amin")
    return {
        "count": cnt[inv],
        "mean": mean[inv],
        "std": var.sqrt()[inv],
        "max": gmax[inv],
        "min": gmin[inv],
        "all_equal": (gmax == gmin)[inv],
    }


def last_token_index(response_mask: Tensor) -> Tensor:
    """Index [B] of the last valid token of each row (0 for an empty row)."""
    t = response_mask.shape[-1]
    pos = torch.arange(t, device=response_mask.device).expand_as(response_mask)
    return torch.where(response_mask.bool(), pos, torch.zeros_like(pos)).amax(dim=-1)


def place_at_last_token(values: Tensor, response_mask: Tensor) -> Tensor:
    """Scatter values [B] onto the last valid token of each row -> [B, T] (0 elsewhere and on empty rows)."""
    out = torch.zeros(response_mask.shape, dtype=values.dtype, device=values.device)
    idx = last_token_index(response_mask)
    has = response_mask.bool().any(dim=-1)
    out[torch.arange(out.shape[0], device=out.device), idx] = torch.where(has, values, torch.zeros_like(values))
    return out
