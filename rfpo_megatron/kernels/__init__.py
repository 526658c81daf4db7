"""Fused kernels (Triton, with torch reference twins): vocab-parallel log-prob/entropy and the RFPO token loss.

Public API (see docs/kernels.md):
- `vocab_parallel_logprobs(logits_local [N, V/tp], labels [N], tp_group=None, temperature=1.0, vocab_size=None,
  compute_entropy=True, inplace_backward=False) -> (logp [N] fp32, entropy [N] fp32 | None)`
- `fused_rfpo_token_loss(logp [N], old_logp [N], advantages [N], cu_seqlens [S+1], log_roff [S], clip_low,
  clip_high, clip_c=None, form="faithful") -> (loss [N], stats)`
- `segment_sum(x [N], cu_seqlens [S+1]) -> [S]`
Each has a `*_torch` twin with the same signature. Importing this package does not import triton.
"""
from .logprob import vocab_parallel_logprobs, vocab_parallel_logprobs_torch
from .loss import fused_rfpo_token_loss, fused_rfpo_token_loss_torch, segment_sum, segment_sum_torch

__all__ = [
    "vocab_parallel_logprobs", "vocab_parallel_logprobs_torch", "fused_rfpo_token_loss",
    "fused_rfpo_token_loss_torch", "segment_sum", "segment_sum_torch",
]
