"""Triton kernels for the vocab-parallel log-prob/entropy: per-shard online log-sum-exp forward, softmax-recompute backward.

Both kernels run one program per row and stream the row's vocab shard in BLOCK_V columns, so nothing
larger than a [BLOCK_V] fp32 tile ever exists. Only columns `< n_valid` are read: the padded tail of the
vocabulary (global id >= true vocab size) is treated as -inf (probability 0, gradient 0).

Forward outputs, per row, with x the raw logits, z = x / T and m = max_j x_j (raw units, so that every
difference x_j - m is exact in fp32 even for logits of magnitude 1e4):
  m,  s = sum_j exp((x_j - m)/T),  a = sum_j exp((x_j - m)/T) * (x_j - m)/T,  xt = x_label (0 off-shard).
The caller combines ranks (all-reduce MAX on m, SUM on the rescaled s, a, xt) and forms
  logp = (xt - M)/T - log S,  entropy = log S - A / S.
Backward: with log p_j = (x_j - M)/T - log S, p_j = exp(log p_j),
  dz_j = g_logp * (1[j = label] - p_j) - g_ent * p_j * (log p_j + H),  dlogits = dz / T.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Reductions go through tl.reduce with triton's own combine functions (what tl.max / tl.sum do for fp32)
# and tiles are built with tl.full, not the @jit helpers tl.max/tl.sum/tl.zeros: those helpers are frozen
# as compiled-only JIT functions when triton was imported before TRITON_INTERPRET=1 was set, which would
# break the interpreter; builtins and these combine functions work in both modes whatever the import order.
_MAX = tl.standard._elementwise_max
_ADD = tl.standard._sum_combine

from .dispatch import interpret_mode, jit


def _fwd_kernel(
    logits_ptr, stride_row, labels_ptr, m_ptr, s_ptr, a_ptr, xt_ptr,
    n_valid, vocab_start, inv_temp,
    BLOCK_V: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)  # running max of the raw logits x
    s = tl.full((), 0.0, tl.float32)
    a = tl.full((), 0.0, tl.float32)
    for start in range(0, n_valid, BLOCK_V):
        cols = start + offs
        valid = cols < n_valid
        x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.reduce(x, 0, _MAX))
        scale = tl.exp((m - m_new) * inv_temp)  # m = -inf only before the first tile; then s = a = 0
        d = tl.where(valid, (x - m_new) * inv_temp, 0.0)  # z - max z, exact difference then scaled
        e = tl.where(valid, tl.exp(d), 0.0)
        if COMPUTE_ENTROPY:
            shift = tl.where(s > 0, (m - m_new) * inv_temp, 0.0)  # avoids (-inf) * 0 before the first tile
            a = scale * (a + shift * s) + tl.reduce(e * d, 0, _ADD)
        s = s * scale + tl.reduce(e, 0, _ADD)
        m = m_new
    label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
    in_shard = (label >= 0) & (label < n_valid)
    safe = tl.where(in_shard, label, 0)
    xt = tl.load(base + safe, mask=in_shard, other=0.0).to(tl.float32)
    xt = tl.where(in_shard, xt, 0.0)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(xt_ptr + row, xt)
    if COMPUTE_ENTROPY:
        tl.store(a_ptr + row, a)


def _bwd_kernel(
    logits_ptr, stride_row, grad_ptr, stride_grad_row, labels_ptr, m_ptr, logs_ptr, ent_ptr, glogp_ptr, gent_ptr,
    n_valid, n_cols, vocab_start, inv_temp,
    BLOCK_V: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, MANUAL_RTNE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    gbase = grad_ptr + row * stride_grad_row
    offs = tl.arange(0, BLOCK_V)
    m = tl.load(m_ptr + row)
    log_s = tl.load(logs_ptr + row)
    gl = tl.load(glogp_ptr + row)
    label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
    if HAS_ENT_GRAD:
        h = tl.load(ent_ptr + row)
        gh = tl.load(gent_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        valid = cols < n_valid
        inside = cols < n_cols
        x = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
        logp = tl.where(valid, (x - m) * inv_temp - log_s, 0.0)
        p = tl.where(valid, tl.exp(logp), 0.0)
        dz = tl.where(cols == label, gl, 0.0) - gl * p
        if HAS_ENT_GRAD:
            dz = dz - gh * p * (logp + h)
        dz = dz * inv_temp
        if MANUAL_RTNE_BF16:
            # the interpreter's fp32 -> bf16 cast truncates; round to nearest even by hand (what GPUs do)
            b = dz.to(tl.uint32, bitcast=True)
            b = b + 0x7FFF + ((b >> 16) & 1)
            tl.store(gbase + cols, (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=inside)
        else:
            tl.store(gbase + cols, dz.to(grad_ptr.dtype.element_ty), mask=inside)


def _block_v(n_cols: int, on_cpu: bool) -> int:
    if on_cpu:  # the interpreter is fastest with few, moderately sized tiles
        return 128
    return min(8192, max(128, triton.next_power_of_2(min(n_cols, 8192))))


def _launch_opts(block_v: int, on_cpu: bool) -> dict:
    """GPU launch options: enough warps that each thread holds <= 16 elements of a tile; FMA contraction on
    (explicitly: triton 3.9 warns when it is left to the default, which changes in 3.10)."""
    if on_cpu:
        return {}
    return {"num_warps": max(4, min(16, block_v // 512)), "enable_fp_fusion": True}


def shard_stats(logits: torch.Tensor, labels: torch.Tensor, n_valid: int, vocab_start: int, inv_temp: float,
                compute_entropy: bool) -> tuple[torch.Tensor, ...]:
    """Per-row shard statistics (m, s, a, xt), each [N] fp32, for logits [N, V/tp] and global labels [N]."""
    n = logits.shape[0]
    dev = logits.device
    m = torch.empty(n, dtype=torch.float32, device=dev)
    s = torch.empty_like(m)
    xt = torch.empty_like(m)
    a = torch.zeros_like(m) if compute_entropy else m  # dummy pointer when unused
    if n > 0:
        block = _block_v(logits.shape[1], not logits.is_cuda)
        jit(_fwd_kernel)[(n,)](
            logits, logits.stride(0), labels, m, s, a, xt,
            n_valid, vocab_start, inv_temp,
            BLOCK_V=block, COMPUTE_ENTROPY=compute_entropy, **_launch_opts(block, not logits.is_cuda),
        )
    return m, s, (a if compute_entropy else None), xt


def logits_grad(logits: torch.Tensor, out: torch.Tensor, labels: torch.Tensor, m: torch.Tensor, log_s: torch.Tensor,
                entropy: torch.Tensor | None, g_logp: torch.Tensor, g_ent: torch.Tensor | None,
                n_valid: int, vocab_start: int, inv_temp: float) -> torch.Tensor:
    """Write d(loss)/d(logits) [N, V/tp] into `out` (may alias `logits`) from [N] fp32 global max m (raw units),
    log S, entropy and the incoming grads."""
    n = logits.shape[0]
    has_ent = g_ent is not None
    if n > 0:
        block = _block_v(logits.shape[1], not logits.is_cuda)
        jit(_bwd_kernel)[(n,)](
            logits, logits.stride(0), out, out.stride(0), labels, m, log_s,
            entropy if has_ent else m, g_logp, g_ent if has_ent else g_logp,
            n_valid, logits.shape[1], vocab_start, inv_temp,
            BLOCK_V=block, HAS_ENT_GRAD=has_ent,
            MANUAL_RTNE_BF16=out.dtype == torch.bfloat16 and interpret_mode(), **_launch_opts(block, not logits.is_cuda),
        )
    return out
