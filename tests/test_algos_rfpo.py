"""RFPO R_off: log R_off = γ(S(o) − S(o_f)) vs a plain reference, clamp, detach, stats, and the end-to-end
"no gradient reaches the wrong sequence's log-probs" check."""

import math

import pytest
import torch

from algos_helpers import roff_stats

from rfpo_megatron.algos import POLICY_LOSSES, compute_actor_loss, compute_log_roff

D = torch.float64


def inputs(seed, B=5):
    g = torch.Generator().manual_seed(seed)
    lw = torch.tensor([4, 1, 6, 3, 2])[:B]
    lf = torch.tensor([2, 5, 6, 1, 3])[:B]
    mw = torch.arange(6).unsqueeze(0) < lw.unsqueeze(1)
    mf = torch.arange(6).unsqueeze(0) < lf.unsqueeze(1)
    pw = torch.where(mw, -3 * torch.rand(B, 6, generator=g, dtype=D), 99.0)  # garbage on padding
    pf = torch.where(mf, -3 * torch.rand(B, 6, generator=g, dtype=D), -99.0)
    fixed = torch.tensor([True, True, False, True, True])[:B]
    return pw, mw, pf, mf, fixed


def ref_log_roff(pw, mw, pf, mf, fixed, mode, gamma, clip):
    out = []
    for i in range(pw.shape[0]):
        if not fixed[i]:
            out.append(0.0)
            continue
        sw = [float(pw[i, t]) for t in range(pw.shape[1]) if mw[i, t]]
        sf = [float(pf[i, t]) for t in range(pf.shape[1]) if mf[i, t]]
        a, b = (sum(sw), sum(sf)) if mode == "seq_sum" else (sum(sw) / len(sw), sum(sf) / len(sf))
        v = gamma * (a - b)
        out.append(v if clip is None else max(-clip, min(clip, v)))
    return out


@pytest.mark.parametrize("mode", ["seq_sum", "seq_mean"])
@pytest.mark.parametrize("gamma", [1.0, 0.5, -1.0])
@pytest.mark.parametrize("clip", [None, 0.7, 5.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_log_roff_matches_reference(mode, gamma, clip, seed):
    args = inputs(seed)
    got = compute_log_roff(*args, mode=mode, gamma=gamma, clip=clip)
    want = ref_log_roff(*args, mode, gamma, clip)
    assert got.shape == (5,) and got.dtype == D
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert float(got[2]) == 0.0  # unfixed row: R_off = 1 exactly


def test_roff_stats():
    pw, mw, pf, mf, fixed = inputs(0)
    raw = compute_log_roff(pw, mw, pf, mf, fixed, mode="seq_sum")
    lr = compute_log_roff(pw, mw, pf, mf, fixed, mode="seq_sum", clip=0.5)
    st = roff_stats(lr, fixed, 0.5, raw_log_roff=raw)
    r = [math.exp(float(x)) for x, f in zip(lr, fixed) if f]
    assert st["roff_mean"] == pytest.approx(sum(r) / len(r))
    assert st["roff_min"] == pytest.approx(min(r)) and st["roff_max"] == pytest.approx(max(r))
    n_clamped = sum(1 for x, f in zip(raw, fixed) if f and abs(float(x)) > 0.5)
    assert st["roff_clamped_frac"] == pytest.approx(n_clamped / 4)
    assert st["roff_clamped_frac"] == pytest.approx(roff_stats(lr, fixed, 0.5)["roff_clamped_frac"])
    assert st["fixed_seq_frac"] == pytest.approx(4 / 5)
    none = roff_stats(torch.zeros(3), torch.zeros(3, dtype=torch.bool), 1.0)
    assert none["roff_mean"] == 1.0 and none["fixed_seq_frac"] == 0.0


@pytest.mark.parametrize("loss", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("form", ["faithful", "corrected"])
def test_no_gradient_reaches_wrong_sequence_logprobs(loss, form):
    """Build R_off from log-probs that REQUIRE grad (as if recomputed by the actor), run the full objective and
    backprop: the wrong sequence's log-probs get no gradient, the fixed sequence's current log-probs do."""
    pw, mw, pf, mf, fixed = inputs(3)
    pw = pw.clone().requires_grad_(True)
    pf_old = pf.clone().requires_grad_(True)
    lr = compute_log_roff(pw, mw, pf_old, mf, fixed, mode="seq_mean", gamma=1.0, clip=2.0)
    assert not lr.requires_grad and lr.grad_fn is None
    logp = (pf.detach() + 0.1).requires_grad_(True)
    A = torch.linspace(-1, 1, 5, dtype=D).unsqueeze(-1).expand(5, 6).contiguous()
    total, _ = compute_actor_loss(loss, logp, pf_old, A, mf, log_roff=lr, loss_form=form, is_fixed=fixed,
                                  clip_ratio_c=3.0, bapo_clip_bounds=(0.7, 1.5), loss_agg_mode="token-mean")
    total.backward()
    assert pw.grad is None
    assert logp.grad is not None and logp.grad[mf].abs().sum() > 0


def test_bad_inputs():
    pw, mw, pf, mf, fixed = inputs(0)
    with pytest.raises(ValueError, match="did you mean 'seq_sum'"):
        compute_log_roff(pw, mw, pf, mf, fixed, mode="seq_summ")
    with pytest.raises(ValueError, match="roff_clip"):
        compute_log_roff(pw, mw, pf, mf, fixed, clip=0.0)
    with pytest.raises(ValueError, match="logp_wrong"):
        compute_log_roff(pw[0], mw, pf, mf, fixed)
