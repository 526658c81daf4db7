"""Vocab-parallel token log-probs and entropy from [N, V/tp] logits, without an fp32 [N, V] copy (Triton + torch twin).

`vocab_parallel_logprobs(logits_local [N, V/tp], labels [N]) -> (logp [N] fp32, entropy [N] fp32 | None)`.

Each rank holds the contiguous vocab slice [rank·V/tp, (rank+1)·V/tp) of the (padded) vocabulary. Per row
the rank computes, in fp32 and relative to its own max, the sum-exp, the Σ exp·(z − max) entropy term and
the target logit (when the label falls in its slice); the ranks then exchange one all-reduce(MAX) of [N]
and one packed all-reduce(SUM) of [N, 2|3]. The backward recomputes the softmax from the logits (no
communication: lse and entropy are already global) and writes the gradient in the logits' dtype,
optionally into the logits' own storage (`inplace_backward=True`).

Columns whose global id is >= `vocab_size` (Megatron pads the vocab to a multiple of 128·tp) are -inf:
probability 0, gradient 0. Labels < 0 are "ignore" rows: logp 0 and no log-prob gradient (entropy is still
computed). Labels >= `vocab_size` are a data error.

Backends (see `dispatch.py`): Triton on CUDA; the torch twin elsewhere; Triton's interpreter on CPU when
RFPO_KERNEL_BACKEND=triton and TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .dispatch import use_triton

# The torch twin upcasts at most this many logits to fp32 at a time (rows are processed in chunks).
TORCH_CHUNK_ELEMS = 1 << 22


def _tp_info(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, temperature: float, vocab_size: int | None,
                  world: int) -> int:
    if logits.dim() != 2:
        raise ValueError(f"logits_local must be 2-D [N, V/tp], got shape {tuple(logits.shape)}; flatten [s, b, V/tp] first")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [N]={logits.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits_local on {logits.device}; move them to one device")
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor of global vocab ids, got {labels.dtype}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite positive number, got {temperature}")
    padded = logits.shape[1] * world
    vocab = padded if vocab_size is None else int(vocab_size)
    if not 0 < vocab <= padded:
        raise ValueError(f"vocab_size={vocab} must be in [1, V/tp·tp={padded}] (the unpadded vocabulary size)")
    if not labels.is_cuda and labels.numel() and int(labels.max()) >= vocab:
        raise ValueError(f"labels contain id {int(labels.max())} >= vocab_size={vocab}; check the tokenizer/vocab_size")
    return vocab


def _combine(m, s, a, xt, inv_temp: float, tp_group, world: int):
    """Merge per-shard stats [N] (raw-logit max m, sum-exp s, entropy term a, target logit xt) across the TP
    group with one all-reduce(MAX) and one packed all-reduce(SUM); returns global (m, log S, entropy|None, xt)."""
    if world > 1:
        gm = m.clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=tp_group)
        has = s > 0  # shards with no valid column have m = -inf, s = 0
        shift = torch.where(has, (m - gm) * inv_temp, torch.zeros_like(s))
        scale = torch.where(has, torch.exp(shift), torch.zeros_like(s))
        cols = [s * scale, xt]
        if a is not None:
            cols.append(scale * (a + shift * s))
        packed = torch.stack(cols, dim=1)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
        s, xt = packed[:, 0], packed[:, 1]
        a = packed[:, 2] if a is not None else None
        m = gm
    log_s = torch.log(s)
    ent = (log_s - a / s) if a is not None else None
    return m, log_s, ent, xt


# ----------------------------------------------------------------------------------------- torch twin kernels
def _torch_shard_stats(logits, labels, n_valid, vocab_start, inv_temp, compute_entropy):
    """Torch twin of the forward kernel: (m, s, a|None, xt) [N] fp32, rows upcast in chunks."""
    n = logits.shape[0]
    dev = logits.device
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(n, dtype=torch.float32, device=dev)
    a = torch.zeros(n, dtype=torch.float32, device=dev) if compute_entropy else None
    xt = torch.zeros(n, dtype=torch.float32, device=dev)
    local = labels.long() - vocab_start
    in_shard = (local >= 0) & (local < n_valid)
    rows = max(1, TORCH_CHUNK_ELEMS // max(1, n_valid))
    for r0 in range(0, n if n_valid > 0 else 0, rows):
        r1 = min(n, r0 + rows)
        d = logits[r0:r1, :n_valid].to(torch.float32, copy=True)
        mc = d.max(dim=1).values
        d.sub_(mc[:, None])  # x - max x: exact in fp32
        if inv_temp != 1.0:
            d.mul_(inv_temp)
        e = torch.exp(d)
        s[r0:r1] = e.sum(dim=1)
        if compute_entropy:
            a[r0:r1] = (e.mul_(d)).sum(dim=1)
        m[r0:r1] = mc
        del d, e
    if n_valid > 0 and n > 0:
        idx = torch.where(in_shard, local, torch.zeros_like(local))
        picked = logits.gather(1, idx[:, None])[:, 0].float()
        xt = torch.where(in_shard, picked, xt)
    return m, s, a, xt


def _torch_logits_grad(logits, out, labels, m, log_s, entropy, g_logp, g_ent, n_valid, vocab_start, inv_temp):
    """Torch twin of the backward kernel: writes d/dlogits [N, V/tp] into `out` chunk by chunk."""
    n, n_cols = logits.shape
    local = labels.long() - vocab_start
    in_shard = (local >= 0) & (local < n_valid)
    rows = max(1, TORCH_CHUNK_ELEMS // max(1, n_cols))
    for r0 in range(0, n if n_valid > 0 else 0, rows):
        r1 = min(n, r0 + rows)
        z = logits[r0:r1, :n_valid].to(torch.float32, copy=True)
        z.sub_(m[r0:r1, None])
        if inv_temp != 1.0:
            z.mul_(inv_temp)
        z.sub_(log_s[r0:r1, None])  # log p
        p = torch.exp(z)
        if g_ent is not None:
            z.add_(entropy[r0:r1, None]).mul_(p).mul_(g_ent[r0:r1, None])  # g_ent * p * (log p + H)
            dz = z.add_(p.mul_(g_logp[r0:r1, None])).neg_()
        else:
            dz = p.mul_(g_logp[r0:r1, None]).neg_()
        hit = torch.nonzero(in_shard[r0:r1])[:, 0]
        if hit.numel():
            dz[hit, local[r0:r1][hit]] += g_logp[r0:r1][hit]
        if inv_temp != 1.0:
            dz.mul_(inv_temp)
        out[r0:r1, :n_valid] = dz
        del z, p, dz
    if n_valid < n_cols:
        out[:, n_valid:] = 0
    return out


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tp_group, temperature, vocab_size, compute_entropy, inplace_backward, triton_path):
        rank, world = _tp_info(tp_group)
        vocab = _check_inputs(logits, labels, temperature, vocab_size, world)
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        labels = labels.contiguous()
        n_local = logits.shape[1]
        vocab_start = rank * n_local
        n_valid = max(0, min(n_local, vocab - vocab_start))
        inv_temp = 1.0 / float(temperature)
        if triton_path:
            from .logprob_triton import shard_stats
        else:
            shard_stats = _torch_shard_stats
        m, s, a, xt = shard_stats(logits, labels, n_valid, vocab_start, inv_temp, compute_entropy)
        m, log_s, ent, xt = _combine(m, s, a, xt, inv_temp, tp_group, world)
        keep = labels >= 0
        logp = torch.where(keep, (xt - m) * inv_temp - log_s, torch.zeros_like(log_s))
        ctx.save_for_backward(logits, labels, m, log_s, ent if ent is not None else m)
        ctx.meta = (n_valid, vocab_start, inv_temp, compute_entropy, inplace_backward, triton_path)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, labels, m, log_s, ent = ctx.saved_tensors
        n_valid, vocab_start, inv_temp, compute_entropy, inplace, triton_path = ctx.meta
        n = logits.shape[0]
        g_logp = torch.zeros(n, dtype=torch.float32, device=logits.device) if g_logp is None else g_logp.float()
        g_logp = torch.where(labels >= 0, g_logp, torch.zeros_like(g_logp)).contiguous()
        if not compute_entropy or g_ent is None:
            g_ent, ent = None, None
        else:
            g_ent = g_ent.float().contiguous()
        out = logits if inplace else torch.empty_like(logits)
        if triton_path:
            from .logprob_triton import logits_grad
        else:
            logits_grad = _torch_logits_grad
        logits_grad(logits, out, labels, m, log_s, ent, g_logp, g_ent, n_valid, vocab_start, inv_temp)
        return out, None, None, None, None, None, None, None


def _apply(logits_local, labels, tp_group, temperature, vocab_size, compute_entropy, inplace_backward, triton_path):
    logp, ent = _VocabParallelLogprobs.apply(
        logits_local, labels, tp_group, float(temperature), vocab_size, bool(compute_entropy),
        bool(inplace_backward), triton_path,
    )
    return logp, (ent if compute_entropy else None)


def vocab_parallel_logprobs(logits_local: torch.Tensor, labels: torch.Tensor, tp_group=None, temperature: float = 1.0,
                            vocab_size: int | None = None, compute_entropy: bool = True,
                            inplace_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-probs and entropies from vocab-sharded logits; autograd-capable; Triton or torch by `dispatch`.

    Args:
        logits_local: [N, V/tp] this rank's vocab slice (bf16/fp16/fp32); never upcast as a whole.
        labels: [N] int global vocab ids (< 0 = ignored row: logp 0, no gradient).
        tp_group: tensor-parallel process group (None or world 1 = no communication).
        temperature: logits are divided by it before the softmax.
        vocab_size: true (unpadded) vocabulary; global ids >= it are masked as -inf. None = V/tp·tp.
        compute_entropy: also return the per-token entropy (differentiable).
        inplace_backward: the backward writes d/dlogits into `logits_local`'s storage (saves one [N, V/tp]
            buffer; the logits must not be used after the backward).
    Returns:
        logp [N] fp32, entropy [N] fp32 (or None).
    """
    return _apply(logits_local, labels, tp_group, temperature, vocab_size, compute_entropy, inplace_backward,
                  use_triton(logits_local))


def vocab_parallel_logprobs_torch(logits_local: torch.Tensor, labels: torch.Tensor, tp_group=None,
                                  temperature: float = 1.0, vocab_size: int | None = None,
                                  compute_entropy: bool = True,
                                  inplace_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch twin of `vocab_parallel_logprobs` (same signature, shapes and math; rows in fp32 chunks)."""
    return _apply(logits_local, labels, tp_group, temperature, vocab_size, compute_entropy, inplace_backward, False)


def vocab_parallel_logprobs_triton(logits_local: torch.Tensor, labels: torch.Tensor, tp_group=None,
                                   temperature: float = 1.0, vocab_size: int | None = None,
                                   compute_entropy: bool = True,
                                   inplace_backward: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton path of `vocab_parallel_logprobs`, forced (CPU needs TRITON_INTERPRET=1)."""
    return _apply(logits_local, labels, tp_group, temperature, vocab_size, compute_entropy, inplace_backward, True)
