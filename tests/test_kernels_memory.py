"""No fp32 [N, V] tensor is ever created by vocab_parallel_logprobs: every op output is recorded by a dispatch mode."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from rfpo_megatron.kernels import logprob as lpmod


class _RecordAllocs(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an aten op returns in NEW storage (not a view of, or in-place on,
    one of its inputs) while active, forward and backward."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.numel()}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (t.numel() == 0 or t.untyped_storage().data_ptr() not in before):
                self.seen.append((tuple(t.shape), t.dtype))
        return out

    def max_numel(self, dtype) -> int:
        return max((torch.Size(s).numel() for s, d in self.seen if d == dtype), default=0)


N, V = 64, 512


def _fwd_bwd(fn, logits, labels):
    x = logits.clone().requires_grad_()
    rec = _RecordAllocs()
    with rec:
        lp, ent = fn(x, labels)
        (lp.sum() + ent.sum()).backward()
    return rec, x.grad


def test_recorder_sees_naive_fp32_upcast():
    # negative control: the naive path does create an fp32 [N, V]
    logits = torch.randn(N, V).to(torch.bfloat16)
    rec = _RecordAllocs()
    with rec:
        logits.float().log_softmax(-1)
    assert rec.max_numel(torch.float32) == N * V


def test_torch_twin_upcasts_at_most_one_row_chunk(monkeypatch):
    monkeypatch.setattr(lpmod, "TORCH_CHUNK_ELEMS", N * V // 4)  # 16 rows per fp32 chunk
    logits = (torch.randn(N, V) * 2).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,))
    rec, grad = _fwd_bwd(lpmod.vocab_parallel_logprobs_torch, logits, labels)
    assert grad.dtype == torch.bfloat16 and grad.shape == (N, V)
    assert rec.max_numel(torch.float32) == N * V // 4  # one chunk, never the whole [N, V]
    assert rec.max_numel(torch.float64) == 0
    # the only new [N, V] buffer is the bf16 gradient (no full-size copy of the logits in any dtype)
    assert [(s, d) for s, d in rec.seen if torch.Size(s).numel() >= N * V] == [((N, V), torch.bfloat16)]


class _LaunchOutsideRecorder:
    """Wraps a jitted kernel so its launch runs with dispatch modes off: the interpreter executes the kernel
    body with numpy on [BLOCK] tiles; what is recorded is every torch allocation of the host code around it."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _disable_current_modes():
                return self.kernel[grid](*args, **kwargs)

        return launch


def test_triton_path_allocates_only_row_vectors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from rfpo_megatron.kernels import dispatch, logprob_triton

    monkeypatch.setattr(logprob_triton, "jit", lambda fn: _LaunchOutsideRecorder(dispatch.jit(fn)))
    logits = (torch.randn(N, V) * 2).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,))
    rec, grad = _fwd_bwd(lpmod.vocab_parallel_logprobs_triton, logits, labels)
    ref, grad_ref = _fwd_bwd(lpmod.vocab_parallel_logprobs_torch, logits, labels)
    assert rec.max_numel(torch.float32) == N  # [N] statistics only
    assert sum(1 for s, d in rec.seen if torch.Size(s).numel() >= N * V) == 1  # the bf16 gradient, nothing else
    assert torch.all((grad.float() - grad_ref.float()).abs() <= 2.0**-7 * grad_ref.float().abs() + 1e-6)
    assert ref.max_numel(torch.float32) > N  # the recorder is active in this setting too


@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_backward_reuses_logits_storage(inplace):
    logits = (torch.randn(N, V) * 2).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,))
    leaf = logits.clone().requires_grad_()
    x = leaf * 1
    rec = _RecordAllocs()
    with rec:
        lp, ent = lpmod.vocab_parallel_logprobs_torch(x, labels, inplace_backward=inplace)
        lp.sum().backward(retain_graph=False)
    full_bf16 = [s for s, d in rec.seen if d == torch.bfloat16 and torch.Size(s).numel() == N * V]
    # backward: the kernel's gradient buffer (not when inplace) + MulBackward's leaf grad
    assert len(full_bf16) == (1 if inplace else 2)
