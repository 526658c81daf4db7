"""Loss aggregation [B, T] -> scalar, normalised by the whole step's counts so micro-batch splits are exact.

Modes (`loss_agg_mode`), with L the per-token loss, m the response mask, |o_i| = Σ_t m_i,t:
  token-mean               Σ L·m / N_tokens                               (DAPO)
  seq-mean-token-mean      Σ_i (Σ_t L_i,t m_i,t / |o_i|) / N_seqs         (original GRPO)
  seq-mean-token-sum       Σ_i Σ_t L_i,t m_i,t / N_seqs
  seq-mean-token-sum-norm  Σ L·m / (N_seqs · max_len)                     (Dr.GRPO; max_len = loss_agg_max_len)
N_tokens / N_seqs default to this call's own counts; pass the counts of the WHOLE step (all micro-batches and,
if gradients are summed across data-parallel ranks, all ranks) and the per-micro-batch values add up to
the whole-batch value exactly. A sequence counts in N_seqs when it has at least one valid token
(`count_tokens_and_seqs`). Note: with global counts the DP gradient reduction must SUM, not average.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rfpo_megatron.config import unknown_name_message
from rfpo_megatron.algos.stats import masked_sum

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def count_tokens_and_seqs(response_mask: Tensor) -> tuple[int, int]:
    """(number of valid tokens, number of sequences with ≥ 1 valid token) of a [B, T] mask."""
    m = response_mask.bool()
    return int(m.sum()), int(m.any(dim=-1).sum())


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    global_num_tokens: float | int | Tensor | None = None,
    global_num_seqs: float | int | Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Aggregate per-token loss [B, T] over mask [B, T] to a 0-dim tensor (see module doc for the modes)."""
    if mode not in LOSS_AGG_MODES:
        raise ValueError(unknown_name_message("algo.loss_agg_mode", mode, LOSS_AGG_MODES))
    m = mask.bool()
    n_tok = m.sum().to(loss.dtype) if global_num_tokens is None else torch.as_tensor(global_num_tokens, dtype=loss.dtype, device=loss.device)
    n_seq = m.any(-1).sum().to(loss.dtype) if global_num_seqs is None else torch.as_tensor(global_num_seqs, dtype=loss.dtype, device=loss.device)
    if mode == "token-mean":
        return masked_sum(loss, m) / n_tok.clamp(min=1)
    if mode == "seq-mean-token-mean":
        seq_len = m.sum(-1).to(loss.dtype).clamp(min=1)
        return (masked_sum(loss, m, dim=-1) / seq_len).sum() / n_seq.clamp(min=1)
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, m) / n_seq.clamp(min=1)
    # seq-mean-token-sum-norm
    if max_len is None or max_len <= 0:
        raise ValueError(
            "loss_agg_max_len: loss_agg_mode=seq-mean-token-sum-norm needs a fixed positive constant "
            f"(got {max_len!r}); set algorithm.loss_agg_max_len (usually max_response_len)"
        )
    return masked_sum(loss, m) / (n_seq.clamp(min=1) * float(max_len))
