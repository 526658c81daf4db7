"""vocab_parallel_logprobs (Triton interpreter and torch twin) against float64 references, single rank."""
from __future__ import annotations

import math

import pytest
import torch

from rfpo_megatron.kernels import logprob as lpmod
from rfpo_megatron.kernels.logprob import (
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_torch,
    vocab_parallel_logprobs_triton,
)
from test_kernels_reference import ref_logprob_grads, ref_logprobs_loops

IMPLS = {"torch": vocab_parallel_logprobs_torch, "triton": vocab_parallel_logprobs_triton}


@pytest.fixture(autouse=True)
def _interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)


def _run(fn, logits, labels, vocab_size, temperature=1.0, w_ent=True, inplace=False):
    x = logits.clone().requires_grad_()
    lp, ent = fn(x, labels, temperature=temperature, vocab_size=vocab_size, inplace_backward=inplace)
    w_lp = torch.linspace(-1.0, 1.5, logits.shape[0])
    w_e = torch.linspace(0.7, -0.4, logits.shape[0]) if w_ent else None
    obj = (w_lp * lp).sum() + ((w_e * ent).sum() if w_ent else 0.0)
    obj.backward()
    return lp.detach(), ent.detach(), x.grad, w_lp, w_e


def _labels(n, vocab_size):
    y = torch.randint(0, vocab_size, (n,))
    y[0] = 0  # first real id
    y[-1] = vocab_size - 1  # last real id
    return y


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    "n, v_pad, vocab, temp, scale",
    [(64, 600, 600, 1.0, 3.0), (37, 600, 577, 0.7, 2.0), (5, 129, 129, 1.3, 1.0), (1, 128, 100, 1.0, 5.0)],
)
def test_fp32_matches_float64(impl, n, v_pad, vocab, temp, scale):
    logits = torch.randn(n, v_pad) * scale
    labels = _labels(n, vocab)
    lp, ent, g, w_lp, w_e = _run(IMPLS[impl], logits, labels, vocab, temp)
    rlp, rent = ref_logprobs_loops(logits, labels, vocab, temp)
    rg = ref_logprob_grads(logits, labels, vocab, temp, w_lp, w_e)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == (n,)
    assert (lp.double() - rlp).abs().max() <= 1e-5
    assert (ent.double() - rent).abs().max() <= 1e-5
    assert (g.double() - rg).abs().max() <= 1e-5
    assert torch.all(g[:, vocab:] == 0)  # padded columns: no gradient


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bf16_matches_float64_of_same_values(impl):
    n, v_pad, vocab = 48, 600, 590
    logits = (torch.randn(n, v_pad) * 4).to(torch.bfloat16)
    labels = _labels(n, vocab)
    lp, ent, g, w_lp, w_e = _run(IMPLS[impl], logits, labels, vocab, 0.9)
    rlp, rent = ref_logprobs_loops(logits, labels, vocab, 0.9)
    rg = ref_logprob_grads(logits, labels, vocab, 0.9, w_lp, w_e)
    assert lp.dtype == torch.float32 and g.dtype == torch.bfloat16
    assert (lp.double() - rlp).abs().max() <= 1e-4
    assert (ent.double() - rent).abs().max() <= 1e-4
    # the gradient is stored in bf16: within 1e-4 plus one bf16 rounding (2^-8 relative) of the exact value,
    # and it IS the correctly rounded exact gradient except where fp32 error crosses a rounding boundary
    assert torch.all((g.double() - rg).abs() <= 1e-4 + rg.abs() * 2.0**-8)
    rounded = rg.to(torch.bfloat16)
    assert (g == rounded).double().mean() >= 0.999
    assert torch.all((g.float() - rounded.float()).abs() <= rounded.float().abs() * 2.0**-7)  # ≤ 1 ulp


@pytest.mark.parametrize("impl", list(IMPLS))
def test_hand_worked_case(impl):
    # softmax([0, ln2, ln3]) = [1/6, 1/3, 1/2]; 4th column is vocab padding (huge value must be ignored).
    logits = torch.tensor([[0.0, math.log(2), math.log(3), 1e4]])
    x = logits.clone().requires_grad_()
    lp, ent = IMPLS[impl](x, torch.tensor([2]), vocab_size=3)
    lp.sum().backward()
    assert lp.item() == pytest.approx(math.log(0.5), abs=1e-6)
    h = -(1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3) + 0.5 * math.log(0.5))
    assert ent.item() == pytest.approx(h, abs=1e-6)
    assert x.grad[0].tolist() == pytest.approx([-1 / 6, -1 / 3, 0.5, 0.0], abs=1e-6)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_large_magnitude_logits(impl, offset):
    n, v = 16, 300
    logits = offset + torch.randn(n, v) * 3
    labels = _labels(n, v)
    lp, ent, g, w_lp, w_e = _run(IMPLS[impl], logits, labels, v)
    rlp, rent = ref_logprobs_loops(logits, labels, v)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(g).all()
    assert (lp.double() - rlp).abs().max() <= 1e-5
    assert (ent.double() - rent).abs().max() <= 1e-5
    assert (g.double() - ref_logprob_grads(logits, labels, v, 1.0, w_lp, w_e)).abs().max() <= 1e-5


@pytest.mark.parametrize("impl", list(IMPLS))
def test_wide_spread_logits_relative(impl):
    # logits spread over ±1e4: log-probs reach -2e4, so compare relatively (fp32 has 24 bits).
    n, v = 8, 200
    logits = torch.randn(n, v) * 1e4
    labels = _labels(n, v)
    lp, ent = IMPLS[impl](logits, labels)
    rlp, rent = ref_logprobs_loops(logits, labels, v)
    assert torch.all((lp.double() - rlp).abs() <= 1e-6 * rlp.abs() + 1e-5)
    assert torch.all((ent.double() - rent).abs() <= 1e-5)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_options_ignore_label_no_entropy_inplace_noncontiguous(impl):
    fn = IMPLS[impl]
    n, v = 12, 260
    big = torch.randn(n, v + 40) * 2
    logits = big[:, 20:20 + v]  # non-contiguous rows (stride v + 40)
    labels = _labels(n, v)
    labels[3] = -100  # ignored row
    rlp, rent = ref_logprobs_loops(logits, labels, v)
    # no entropy: returns None, and the logp gradient equals the reference with w_ent = 0
    x = logits.detach().clone().requires_grad_()
    lp, ent = fn(x, labels, compute_entropy=False)
    assert ent is None
    lp.sum().backward()
    assert lp[3].item() == 0.0 and (lp.double() - rlp).abs().max() <= 1e-5
    rg = ref_logprob_grads(logits, labels, v, 1.0, torch.ones(n), None)
    assert (x.grad.double() - rg).abs().max() <= 1e-5
    assert torch.all(x.grad[3].double() == 0)  # ignored row gets no log-prob gradient
    # entropy returned but only logp used: the entropy-grad path is skipped and the result is the same
    x2 = logits.detach().clone().requires_grad_()
    lp2, ent2 = fn(x2, labels)
    lp2.sum().backward()
    assert (ent2.double() - rent).abs().max() <= 1e-5
    assert torch.equal(x.grad, x2.grad)
    # in-place backward: same gradient, written into the logits' own storage
    leaf = logits.detach().clone().requires_grad_()
    x3 = leaf * 1.0  # non-leaf so the kernel may overwrite it
    lp3, ent3 = fn(x3, labels, inplace_backward=True)
    ptr = x3.data_ptr()
    captured = {}
    x3.register_hook(lambda g: captured.update(ptr=g.data_ptr()))
    (lp3.sum() + 0.5 * ent3.sum()).backward()
    rg3 = ref_logprob_grads(logits, labels, v, 1.0, torch.ones(n), torch.full((n,), 0.5))
    assert (leaf.grad.double() - rg3).abs().max() <= 1e-5
    assert captured["ptr"] == ptr


def test_triton_and_twin_agree_and_dispatch(monkeypatch):
    n, v = 20, 333
    logits = torch.randn(n, v) * 2
    labels = _labels(n, 300)
    a = _run(vocab_parallel_logprobs_torch, logits, labels, 300, 1.1)
    b = _run(vocab_parallel_logprobs_triton, logits, labels, 300, 1.1)
    for x, y in zip(a[:3], b[:3]):
        assert (x - y).abs().max() <= 2e-6
    # dispatch: CPU default = torch twin; RFPO_KERNEL_BACKEND=triton = interpreter; both give the same values
    calls = []
    orig = lpmod._apply
    monkeypatch.setattr(lpmod, "_apply", lambda *args: calls.append(args[-1]) or orig(*args))
    monkeypatch.delenv("RFPO_KERNEL_BACKEND", raising=False)
    vocab_parallel_logprobs(logits, labels)
    monkeypatch.setenv("RFPO_KERNEL_BACKEND", "triton")
    vocab_parallel_logprobs(logits, labels)
    monkeypatch.setenv("RFPO_KERNEL_BACKEND", "torch")
    vocab_parallel_logprobs(logits, labels)
    assert calls == [False, True, False]


def test_user_errors_are_clear(monkeypatch):
    fn = vocab_parallel_logprobs_torch
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        fn(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        fn(x, torch.tensor([0, 1, 9, 2]), vocab_size=8)
    with pytest.raises(ValueError, match="vocab_size=11"):
        fn(x, torch.zeros(4, dtype=torch.long), vocab_size=11)
    with pytest.raises(ValueError, match="temperature"):
        fn(x, torch.zeros(4, dtype=torch.long), temperature=0.0)
    monkeypatch.setenv("RFPO_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="RFPO_KERNEL_BACKEND"):
        vocab_parallel_logprobs(x, torch.zeros(4, dtype=torch.long))
    monkeypatch.setenv("RFPO_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        vocab_parallel_logprobs(x, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_empty_batch_and_fp16(impl):
    fn = IMPLS[impl]
    x = torch.zeros(0, 50, requires_grad=True)
    lp, ent = fn(x, torch.zeros(0, dtype=torch.long))
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == (0, 50)
    logits = (torch.randn(9, 200) * 3).to(torch.float16)
    labels = _labels(9, 190)
    lp, ent, g, w_lp, w_e = _run(fn, logits, labels, 190)
    rlp, rent = ref_logprobs_loops(logits, labels, 190)
    rg = ref_logprob_grads(logits, labels, 190, 1.0, w_lp, w_e)
    assert (lp.double() - rlp).abs().max() <= 1e-4 and (ent.double() - rent).abs().max() <= 1e-4
    assert g.dtype == torch.float16 and torch.all((g.double() - rg).abs() <= 1e-4 + rg.abs() * 2.0**-11)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_entropy_only_backward(impl):
    n, v = 10, 257
    logits = torch.randn(n, v) * 2
    labels = _labels(n, 250)
    x = logits.clone().requires_grad_()
    _, ent = IMPLS[impl](x, labels, temperature=1.4, vocab_size=250)
    w = torch.linspace(-1, 1, n)
    (w * ent).sum().backward()  # logp unused: its incoming gradient is None
    rg = ref_logprob_grads(logits, labels, 250, 1.4, torch.zeros(n), w)
    assert (x.grad.double() - rg).abs().max() <= 1e-5


def test_twin_row_chunks_and_int32_labels(monkeypatch):
    n, v, vocab = 30, 200, 190
    monkeypatch.setattr(lpmod, "TORCH_CHUNK_ELEMS", 7 * vocab)  # 7-row chunks: 30 = 4·7 + 2
    logits = torch.randn(n, v) * 2
    labels = _labels(n, vocab).to(torch.int32)
    for fn in IMPLS.values():
        lp, ent, g, w_lp, w_e = _run(fn, logits, labels, vocab, 1.1)
        rlp, rent = ref_logprobs_loops(logits, labels, vocab, 1.1)
        assert (lp.double() - rlp).abs().max() <= 1e-5 and (ent.double() - rent).abs().max() <= 1e-5
        assert (g.double() - ref_logprob_grads(logits, labels.long(), vocab, 1.1, w_lp, w_e)).abs().max() <= 1e-5
