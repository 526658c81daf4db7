"""fused_rfpo_token_loss and segment_sum (Triton interpreter and torch twin) vs a float64 loop and the algos registry."""
from __future__ import annotations

import math

import pytest
import torch

from rfpo_megatron.kernels.loss import (
    fused_rfpo_token_loss,
    fused_rfpo_token_loss_torch,
    fused_rfpo_token_loss_triton,
    segment_sum,
    segment_sum_torch,
    segment_sum_triton,
)
from test_kernels_reference import ref_rfpo_loss_loops

IMPLS = {"torch": fused_rfpo_token_loss_torch, "triton": fused_rfpo_token_loss_triton}
SEGSUMS = {"torch": segment_sum_torch, "triton": segment_sum_triton}
LENS = [7, 0, 150, 1, 33, 64, 12]  # an empty sequence and one longer than the 128-token tile


@pytest.fixture(autouse=True)
def _interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _batch(seed: int, dtype=torch.float64, lens=LENS):
    g = torch.Generator().manual_seed(seed)
    lens_t = torch.tensor(lens)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens_t.cumsum(0)]).to(torch.int32)
    n, s = int(cu[-1]), len(lens)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(n, generator=g, dtype=torch.float64) * 0.4  # ratios from ~0.3 to ~3
    logp[::9] += 1.6  # some ratios ~5 (dual clip for A < 0)
    adv = torch.randn(s, generator=g, dtype=torch.float64).repeat_interleave(lens_t) + 0.3 * torch.randn(
        n, generator=g, dtype=torch.float64)
    fixed = torch.rand(s, generator=g) < 0.5
    log_roff = torch.where(fixed, torch.randn(s, generator=g, dtype=torch.float64) * 0.6, torch.zeros(s, dtype=torch.float64))
    return logp.to(dtype), old.to(dtype), adv.to(dtype), cu, log_roff.to(dtype)


def _run(fn, logp, old, adv, cu, log_roff, clip_c, form, lo=0.2, hi=0.28):
    x = logp.clone().requires_grad_()
    loss, stats = fn(x, old, adv, cu, log_roff, lo, hi, clip_c, form)
    w = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)
    (w * loss).sum().backward()
    return loss.detach(), x.grad / w.to(x.grad.dtype), stats


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("form", ["faithful", "corrected"])
@pytest.mark.parametrize("clip_c", [None, 3.0])
def test_matches_float64_loop_reference(impl, form, clip_c):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        logp, old, adv, cu, lr = _batch(1, dtype)
        loss, grad, stats = _run(IMPLS[impl], logp, old, adv, cu, lr, clip_c, form)
        rl, rg = ref_rfpo_loss_loops(logp, old, adv, cu, lr, 0.2, 0.28, clip_c, form)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.all((loss.double() - rl).abs() <= tol * (1 + rl.abs())), dtype
        assert torch.all((grad.double() - rg).abs() <= tol * (1 + rg.abs())), dtype
        # the batch exercises every branch
        assert stats["clipped_low"].any() and stats["clipped_high"].any() and (~stats["clipped"]).any()
        if clip_c is not None:
            assert stats["dual_clipped"].any()
        else:
            assert not stats["dual_clipped"].any()


def _padded(x, cu, fill=0.0):
    lens = (cu[1:] - cu[:-1]).tolist()
    out = torch.full((len(lens), max(lens)), fill, dtype=x.dtype)
    mask = torch.zeros(len(lens), max(lens), dtype=torch.bool)
    for i, (a, n) in enumerate(zip(cu[:-1].tolist(), lens)):
        out[i, :n] = x[a:a + n]
        mask[i, :n] = True
    return out, mask


def _registry_ppo():
    algos = pytest.importorskip("rfpo_megatron.algos", reason="algos registry not importable")
    return algos.POLICY_LOSSES["ppo"]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("form", ["faithful", "corrected"])
@pytest.mark.parametrize("clip_c", [None, 3.0])
def test_matches_algos_registry_ppo(impl, form, clip_c):
    ppo = _registry_ppo()
    for seed in (2, 3):
        logp, old, adv, cu, lr = _batch(seed, torch.float64)
        loss, grad, stats = _run(IMPLS[impl], logp, old, adv, cu, lr, clip_c, form)
        lp_pad, mask = _padded(logp, cu)
        lp_pad.requires_grad_()
        old_pad, _ = _padded(old, cu)
        adv_pad, _ = _padded(adv, cu)
        rl, met = ppo(lp_pad, old_pad, adv_pad, mask, log_roff=lr, loss_form=form, clip_ratio_low=0.2,
                      clip_ratio_high=0.28, clip_ratio_c=clip_c)
        rl.sum().backward()
        assert (loss - rl[mask]).abs().max() <= 1e-6
        assert (grad - lp_pad.grad[mask]).abs().max() <= 1e-6
        assert stats["clipped"].double().mean().item() == pytest.approx(met["clipfrac"].item(), abs=1e-12)
        if clip_c is not None:
            assert stats["dual_clipped"].double().mean().item() == pytest.approx(met["clipfrac_lower"].item(), abs=1e-12)
        # fp32 inputs against the float64 registry: within 1e-6 relative
        loss32, grad32, _ = _run(IMPLS[impl], logp.float(), old.float(), adv.float(), cu, lr.float(), clip_c, form)
        assert torch.all((loss32.double() - rl[mask]).abs() <= 1e-6 * (1 + rl[mask].abs()))
        assert torch.all((grad32.double() - lp_pad.grad[mask]).abs() <= 1e-6 * (1 + lp_pad.grad[mask].abs()))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_unfixed_forms_agree_and_hand_case(impl):
    fn = IMPLS[impl]
    logp, old, adv, cu, _ = _batch(4)
    zero = torch.zeros(cu.shape[0] - 1, dtype=torch.float64)
    a, ga, _ = _run(fn, logp, old, adv, cu, zero, 3.0, "faithful")
    b, gb, _ = _run(fn, logp, old, adv, cu, zero, 3.0, "corrected")
    assert torch.equal(a, b) and torch.equal(ga, gb)  # R_off ≡ 1: both forms are vanilla PPO
    # hand case (see test_kernels_reference.test_ref_loss_hand_cases): r = 1.5, 0.5, 1.1·2 with R = 1, 1, 2
    x = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.1)], dtype=torch.float64, requires_grad=True)
    loss, st = fn(x, torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64),
                  torch.tensor([0, 1, 2, 3]), torch.tensor([0.0, 0.0, math.log(2.0)], dtype=torch.float64),
                  0.2, 0.2, 3.0, "faithful")
    loss.sum().backward()
    assert loss.tolist() == pytest.approx([-1.2, 0.8, -4.4])
    assert x.grad.tolist() == pytest.approx([0.0, 0.0, -4.4])
    assert st["clipped"].tolist() == [True, True, False]
    assert st["clipped_high"].tolist() == [True, False, False] and st["clipped_low"].tolist() == [False, True, False]
    assert st["ratio"].tolist() == pytest.approx([1.5, 0.5, 2.2])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_extreme_log_ratio_and_bf16(impl):
    fn = IMPLS[impl]
    cu = torch.tensor([0, 4])
    x = torch.tensor([0.0, -1.0, 30.0, -40.0], requires_grad=True)
    old = torch.tensor([0.0, -1.5, 0.0, 0.0])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, st = fn(x, old, adv, cu, torch.zeros(1), 0.2, 0.2, 10.0, "faithful")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert x.grad[2] == 0 and x.grad[3] == 0  # log-ratio beyond ±20 is clamped: no gradient
    assert loss[2].item() == pytest.approx(10.0) and st["dual_clipped"][2]  # r = e^20, A = -1 -> dual clip c = 10
    # bf16 logp: fp32 math, gradient returned in bf16
    xb = torch.tensor([-0.5, -1.25], dtype=torch.bfloat16, requires_grad=True)
    lb, _ = fn(xb, torch.tensor([-0.5, -1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0, 2]), torch.zeros(1), 0.2, 0.2)
    lb.sum().backward()
    assert lb.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    assert lb.tolist() == pytest.approx([-1.0, -math.exp(-0.25)], abs=1e-6)


@pytest.mark.parametrize("impl", list(SEGSUMS))
def test_segment_sum(impl):
    logp, _, _, cu, _ = _batch(5)
    x = logp.clone().requires_grad_()
    out = SEGSUMS[impl](x, cu)
    ref = [math.fsum(logp[a:b].tolist()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert out.dtype == torch.float64 and out.tolist() == pytest.approx(ref, abs=1e-12)
    w = torch.arange(1.0, len(ref) + 1, dtype=torch.float64)
    (w * out).sum().backward()
    lens = (cu[1:] - cu[:-1]).long()
    assert torch.equal(x.grad, w.repeat_interleave(lens))
    out32 = SEGSUMS[impl](logp.float(), cu)
    assert out32.dtype == torch.float32 and (out32.double() - torch.tensor(ref, dtype=torch.float64)).abs().max() < 1e-4
    algos = pytest.importorskip("rfpo_megatron.algos")
    lp_pad, mask = _padded(logp, cu)
    assert out.detach().tolist() == pytest.approx(algos.sequence_logp(lp_pad, mask, "seq_sum").tolist(), abs=1e-12)


def test_dispatch_cpu_default_and_triton_env(monkeypatch):
    logp, old, adv, cu, lr = _batch(6, torch.float32)
    monkeypatch.delenv("RFPO_KERNEL_BACKEND", raising=False)
    a, _ = fused_rfpo_token_loss(logp, old, adv, cu, lr, 0.2, 0.2, 3.0)
    s_a = segment_sum(logp, cu)
    monkeypatch.setenv("RFPO_KERNEL_BACKEND", "triton")
    b, _ = fused_rfpo_token_loss(logp, old, adv, cu, lr, 0.2, 0.2, 3.0)
    s_b = segment_sum(logp, cu)
    assert (a - b).abs().max() <= 2e-6 and (s_a - s_b).abs().max() <= 1e-4


def test_user_errors_are_clear():
    logp, old, adv, cu, lr = _batch(7, torch.float32)
    fn = fused_rfpo_token_loss_torch
    with pytest.raises(ValueError, match="cu_seqlens"):
        fn(logp, old, adv, cu[:-1], lr[:-1], 0.2, 0.2)
    with pytest.raises(ValueError, match="log_roff"):
        fn(logp, old, adv, cu, lr[:-1], 0.2, 0.2)
    with pytest.raises(ValueError, match="form"):
        fn(logp, old, adv, cu, lr, 0.2, 0.2, None, "exact")
    with pytest.raises(ValueError, match="clip_c"):
        fn(logp, old, adv, cu, lr, 0.2, 0.2, 0.5)
    with pytest.raises(ValueError, match="clip_low"):
        fn(logp, old, adv, cu, lr, 1.2, 0.2)
    with pytest.raises(ValueError, match="advantages"):
        fn(logp, old, adv[:-1], cu, lr, 0.2, 0.2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        segment_sum_torch(logp, cu[:-1])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_empty_inputs(impl):
    x = torch.zeros(0, requires_grad=True)
    loss, st = IMPLS[impl](x, torch.zeros(0), torch.zeros(0), torch.tensor([0]), torch.zeros(0), 0.2, 0.2, 3.0)
    loss.sum().backward()
    assert loss.shape == (0,) and st["clipped"].shape == (0,) and x.grad.shape == (0,)
    out = SEGSUMS[impl](torch.ones(0), torch.tensor([0]))
    assert out.shape == (0,)
    out = SEGSUMS[impl](torch.zeros(0), torch.tensor([0, 0, 0]))  # two empty sequences
    assert out.tolist() == [0.0, 0.0]


def test_device_mismatch_is_clear():
    logp, old, adv, cu, lr = _batch(8, torch.float32)
    with pytest.raises(ValueError, match="one device"):
        fused_rfpo_token_loss_torch(logp, old, adv, cu.to("meta"), lr, 0.2, 0.2)
