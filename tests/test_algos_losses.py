"""Policy losses vs plain per-token float64 references (value AND defined gradient), gradcheck, R_off forms."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

sys.path.insert(0, str(Path(__file__).parent))
import _algos_ref as ref  # noqa: E402

from rfpo_megatron.algos import POLICY_LOSSES, aggregate, bapo_bounds, get_policy_loss  # noqa: E402
from rfpo_megatron.algos.policy_loss import LOSS_NAMES  # noqa: E402

D = torch.float64
ALL = ["ppo", "gspo", "cispo", "gppo", "aspo", "ecpo", "bapo", "reinforce_loss", "raft_pp"]


def batch(seed, B=6, T=5, spread=0.5, per_seq_adv=False):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T
    m = torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)
    lp = -(0.05 + 2.5 * torch.rand(B, T, generator=g, dtype=D))
    old = lp + spread * torch.randn(B, T, generator=g, dtype=D)
    A = torch.randn(B, 1 if per_seq_adv else T, generator=g, dtype=D).expand(B, T).clone()
    if not per_seq_adv:
        A[0, 1] = 0.0
    lp = torch.where(m, lp, torch.full_like(lp, -40.0))  # finite garbage on padding: must not leak
    old = torch.where(m, old, torch.full_like(old, 25.0))
    log_roff = 0.6 * torch.randn(B, generator=g, dtype=D)
    log_roff[1] = 0.0  # an unfixed row
    return lp, old, A, m, log_roff


def run(name, lp, old, A, m, **kw):
    x = lp.clone().requires_grad_(True)
    loss, met = get_policy_loss(name)(x, old, A, m, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad, met


def ref_table(fn, lp, old, A, m, R=None, **kw):
    B, T = lp.shape
    val = torch.zeros(B, T, dtype=D)
    grad = torch.zeros(B, T, dtype=D)
    for i in range(B):
        for t in range(T):
            if not m[i, t]:
                continue
            extra = {} if R is None else {"R": math.exp(float(R[i]))}
            v, gr = fn(float(lp[i, t]), float(old[i, t]), float(A[i, t]), **extra, **kw)
            val[i, t], grad[i, t] = v, gr
    return val, grad


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_registry_lists_every_loss():
    assert set(POLICY_LOSSES) == set(ALL) == set(LOSS_NAMES)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c", [None, 3.0, 1.5])
@pytest.mark.parametrize("form", ["faithful", "corrected", None])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_ppo_matches_reference(seed, c, form, eps):
    lp, old, A, m, lr = batch(seed)
    kw = dict(clip_ratio_low=eps[0], clip_ratio_high=eps[1], clip_ratio_c=c)
    if form is None:
        val, grad, met = run("ppo", lp, old, A, m, **kw)
        rv, rg = ref_table(ref.ref_ppo_tok, lp, old, A, m, el=eps[0], eh=eps[1], c=c)
    else:
        val, grad, met = run("ppo", lp, old, A, m, log_roff=lr, loss_form=form, **kw)
        rv, rg = ref_table(ref.ref_ppo_tok, lp, old, A, m, R=lr, form=form, el=eps[0], eh=eps[1], c=c)
    close(val, rv)
    close(grad, rg)
    # clipfrac: share of valid tokens where the clipped branch is the larger loss
    assert 0.0 < float(met["clipfrac"]) < 1.0
    assert float(met["ppo_kl"]) == pytest.approx(float((old - lp)[m].mean()), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c", [None, 1.5])
def test_raft_pp_is_ppo_on_kept_rows(seed, c):
    lp, old, A, m, lr = batch(seed)
    keep = torch.tensor([True, False, True, True, False, True])
    val, grad, _ = run("raft_pp", lp, old, A, m, keep_mask=keep, clip_ratio_c=c)
    rv, rg = ref_table(ref.ref_ppo_tok, lp, old, A, m & keep.unsqueeze(-1), c=c)
    close(val, rv)
    close(grad, rg)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("c", [None, 1.5])
def test_gppo_value_is_ppo_and_gradient_weights_are_piecewise(seed, c):
    lp, old, A, m, _ = batch(seed, spread=0.6)
    val, grad, _ = run("gppo", lp, old, A, m, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=c)
    rv, rg = ref_table(ref.ref_gppo_tok, lp, old, A, m, el=0.2, eh=0.28, c=c)
    close(val, rv)
    close(grad, rg)
    pv, _, _ = run("ppo", lp, old, A, m, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=c)
    assert torch.equal(val, pv)  # forward value bit-identical to ppo
    # the piecewise cases were all exercised
    rho = torch.exp(lp - old)[m]
    a = A[m]
    assert ((rho < 0.8) & (a < 0)).any() and ((rho > 1.28) & (a > 0)).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("form", ["faithful", "corrected", None])
def test_cispo_gradient_is_sg_clip_rho_times_A(seed, form):
    lp, old, A, m, lr = batch(seed)
    kw = {} if form is None else dict(log_roff=lr, loss_form=form)
    val, grad, _ = run("cispo", lp, old, A, m, clip_ratio_low=0.2, clip_ratio_high=0.28, **kw)
    extra = {} if form is None else dict(R=lr, form=form)
    rv, rg = ref_table(ref.ref_cispo_tok, lp, old, A, m, el=0.2, eh=0.28, **extra)
    close(val, rv)
    close(grad, rg)
    if form is None:  # explicitly: ∇ = −sg(clip(ρ))·A·∇logp
        w = torch.clamp(torch.exp(lp - old), 0.8, 1.28)
        close(grad, torch.where(m, -w * A, 0.0))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("c", [None, 1.6])
@pytest.mark.parametrize("form", ["faithful", "corrected", None])
def test_aspo_matches_reference(seed, c, form):
    lp, old, A, m, lr = batch(seed, spread=0.6)
    kw = {} if form is None else dict(log_roff=lr, loss_form=form)
    val, grad, _ = run("aspo", lp, old, A, m, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=c, **kw)
    extra = {} if form is None else dict(R=lr, form=form)
    rv, rg = ref_table(ref.ref_aspo_tok, lp, old, A, m, el=0.2, eh=0.28, c=c, **extra)
    close(val, rv)
    close(grad, rg)


def test_aspo_flipped_weight_on_positive_tokens():
    # one positive token inside the clip range: value −A/ρ, gradient −A/ρ (∝ 1/π_θ: low-prob tokens get more)
    lp = torch.tensor([[math.log(0.3)]], dtype=D)
    old = torch.tensor([[math.log(0.3 / 1.1)]], dtype=D)  # ρ = 1.1
    val, grad, _ = run("aspo", lp, old, torch.tensor([[2.0]], dtype=D), torch.ones(1, 1, dtype=torch.bool), clip_ratio_high=0.28)
    assert float(val) == pytest.approx(-2.0 / 1.1, rel=1e-12) and float(grad) == pytest.approx(-2.0 / 1.1, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("form", ["faithful", "corrected", None])
@pytest.mark.parametrize("c", [None, 3.0])
def test_ecpo_matches_reference(seed, form, c):
    lp, old, A, m, lr = batch(seed, spread=0.8)
    kw = {} if form is None else dict(log_roff=lr, loss_form=form)
    val, grad, _ = run("ecpo", lp, old, A, m, clip_ratio_high=0.2, ecpo_delta=0.15, clip_ratio_c=c, **kw)
    extra = {} if form is None else dict(R=lr, form=form)
    rv, rg = ref_table(ref.ref_ecpo_tok, lp, old, A, m, el=0.2, eh=0.2, delta=0.15, c=c, **extra)
    close(val, rv)
    close(grad, rg)
    # the cap is exercised: negative-advantage tokens above 1+ε+δ keep gradient weight 1+ε+δ
    rho = torch.exp(lp - old)
    sel = m & (rho > 1.35) & (A < 0)
    assert sel.any()
    if form is None and c is None:
        close(grad[sel], -A[sel] * 1.35)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("form", ["faithful", "corrected", None])
def test_reinforce_loss(seed, form):
    lp, old, A, m, lr = batch(seed)
    kw = {} if form is None else dict(log_roff=lr, loss_form=form)
    val, grad, _ = run("reinforce_loss", lp, old, A, m, **kw)
    extra = {} if form is None else dict(R=lr, form=form)
    rv, rg = ref_table(ref.ref_reinforce_tok, lp, old, A, m, **extra)
    close(val, rv)
    close(grad, rg)


BAPO_KW = dict(bapo_rho0=0.4, bapo_a_low=0.6, bapo_a_high=1.2, bapo_b_low=0.9, bapo_b_high=3.0, bapo_delta_high=0.05, bapo_delta_low=0.02)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rho0", [0.4, 0.6, 0.97])
def test_bapo_bounds_and_loss_match_reference(seed, rho0):
    lp, old, A, m, _ = batch(seed, spread=0.8)
    A = A - 0.4  # negative-dominated, so the bounds have to move
    kw = {**BAPO_KW, "bapo_rho0": rho0}
    ratios = torch.exp(lp - old)[m].tolist()
    c_lo, c_hi, share = ref.ref_bapo_bounds(ratios, A[m].tolist(), rho0, 0.6, 1.2, 0.9, 3.0, 0.05, 0.02)
    got = bapo_bounds(torch.exp(lp - old), A, m, **kw)
    assert got[0] == pytest.approx(c_lo, abs=1e-12) and got[1] == pytest.approx(c_hi, abs=1e-12)
    assert got[2] == pytest.approx(share, rel=1e-10)
    val, grad, met = run("bapo", lp, old, A, m, **kw)
    rv, rg = ref_table(ref.ref_ppo_tok, lp, old, A, m, lo=c_lo, hi=c_hi)
    close(val, rv)
    close(grad, rg)
    assert float(met["bapo_c_low"]) == pytest.approx(c_lo) and float(met["bapo_c_high"]) == pytest.approx(c_hi)


def test_bapo_bounds_move_in_the_documented_order():
    # all mass negative: share 0 < rho0 -> c_high runs to b+, then c_low to b-
    x = torch.tensor([[1.0, 1.0]], dtype=D)
    a = torch.tensor([[-1.0, -1.0]], dtype=D)
    m = torch.ones(1, 2, dtype=torch.bool)
    assert bapo_bounds(x, a, m, **BAPO_KW)[:2] == pytest.approx((0.9, 3.0))
    # one positive token with ratio 1.5 above a+ = 1.2: raising c_high to 1.5 makes the share 0.5 ≥ 0.4
    x = torch.tensor([[1.5, 1.0]], dtype=D)
    a = torch.tensor([[1.0, -1.5]], dtype=D)
    lo, hi, share = bapo_bounds(x, a, m, **BAPO_KW)
    assert (lo, hi) == pytest.approx((0.6, 1.5)) and share == pytest.approx(0.5)
    # already balanced: start bounds kept
    a = torch.tensor([[1.0, 1.0]], dtype=D)
    assert bapo_bounds(torch.ones(1, 2, dtype=D), a, m, **BAPO_KW)[:2] == pytest.approx((0.6, 1.2))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("form", ["faithful", "corrected", None])
def test_gspo_value_and_sequence_level_gradient(seed, form):
    lp, old, A, m, lr = batch(seed, spread=0.15, per_seq_adv=True)
    eps_l, eps_h = 0.03, 0.04
    kw = dict(clip_ratio_low=eps_l, clip_ratio_high=eps_h)
    if form is not None:
        kw.update(log_roff=lr, loss_form=form)
    x = lp.clone().requires_grad_(True)
    loss, _ = get_policy_loss("gspo")(x, old, A, m, **kw)
    agg = aggregate(loss, m, "seq-mean-token-mean")
    agg.backward()
    B = lp.shape[0]
    # reference: sequence-level GSPO objective J = mean_i −min(s_i R A_i, clip(s_i R) A'_i), written per sequence
    seq_val, seq_grad = [], torch.zeros_like(lp)
    for i in range(B):
        pos = [t for t in range(lp.shape[1]) if m[i, t]]
        s = math.exp(sum(float(lp[i, t] - old[i, t]) for t in pos) / len(pos))
        R = 1.0 if form is None else math.exp(float(lr[i]))
        a = float(A[i, 0])
        ac = a * R if form == "faithful" else a
        l1, l2 = -a * s * R, -ac * ref.clip(s * R, 1 - eps_l, 1 + eps_h)
        seq_val.append(max(l1, l2))
        for t in pos:
            # d s_i / d logp_t = s_i / |o_i|; the clipped branch is constant outside its range; divide by B
            inside = 1 - eps_l < s * R < 1 + eps_h
            seq_grad[i, t] = (-a * R * s / len(pos) if l1 >= l2 else (-ac * R * s / len(pos) if inside else 0.0)) / B
            assert float(loss[i, t].detach()) == pytest.approx(max(l1, l2), rel=1e-10, abs=1e-12)
    assert float(agg.detach()) == pytest.approx(sum(seq_val) / B, rel=1e-10)
    close(x.grad, seq_grad)


# --------------------------------------------------------------------------------------------------- gradcheck
GC_KW = {
    "ppo": dict(clip_ratio_c=1.5),
    "raft_pp": dict(clip_ratio_c=1.5, keep_mask=torch.tensor([True, False, True, True, True, True])),
    "gspo": dict(clip_ratio_low=0.05, clip_ratio_high=0.05),
    "cispo": dict(clip_ratio_high=0.28),
    "gppo": dict(clip_ratio_c=1.5),
    "aspo": dict(clip_ratio_c=1.6),
    "ecpo": dict(ecpo_delta=0.1),
    "bapo": dict(bapo_clip_bounds=(0.7, 1.4)),
    "reinforce_loss": {},
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("form", ["faithful", "corrected", None])
def test_gradcheck_float64(name, form):
    """gradcheck per loss. Stop-gradient terms are evaluated at the fixed point logp_sg = x0, so the function
    being checked is exactly the one whose derivative autograd is supposed to return."""
    lp, old, A, m, lr = batch(7, spread=0.5, per_seq_adv=(name == "gspo"))
    kw = dict(GC_KW[name])
    if form is not None:
        kw.update(log_roff=lr, loss_form=form)
    x0 = lp.clone()

    def f(x):
        loss, _ = get_policy_loss(name)(x, old, A, m, logp_sg=x0, **kw)
        return loss

    assert gradcheck(f, (x0.clone().requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_detects_stop_gradient():
    """Sanity of the harness: without the fixed sg point, CISPO's value depends on logp through sg(clip(ρ)), so
    finite differences and the (intended) analytic gradient must disagree."""
    lp, old, A, m, _ = batch(7)

    def f(x):
        return get_policy_loss("cispo")(x, old, A, m, clip_ratio_low=10.0, clip_ratio_high=10.0)[0]

    assert not gradcheck(f, (lp.clone().requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False)


# ------------------------------------------------------------------------------------------------------ R_off
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("form", ["faithful", "corrected"])
def test_roff_identity_equals_base_exactly(name, form):
    for dtype in (torch.float32, D):
        lp, old, A, m, _ = batch(3, per_seq_adv=(name == "gspo"))
        lp, old, A = lp.to(dtype), old.to(dtype), A.to(dtype)
        kw = dict(GC_KW[name])
        v0, g0, met0 = run(name, lp, old, A, m, **kw)
        v1, g1, met1 = run(name, lp, old, A, m, log_roff=torch.zeros(lp.shape[0], dtype=dtype), loss_form=form, **kw)
        assert torch.equal(v0, v1) and torch.equal(g0, g1)
        for k in met0:
            assert torch.equal(met0[k], met1[k]) or (torch.isnan(met0[k]) and torch.isnan(met1[k]))


def test_faithful_vs_corrected_differ_exactly_as_specified():
    lp, old, A, m, lr = batch(11, spread=0.7)
    R = torch.exp(lr).unsqueeze(-1)
    vf, _, _ = run("ppo", lp, old, A, m, log_roff=lr, loss_form="faithful")
    vc, _, _ = run("ppo", lp, old, A, m, log_roff=lr, loss_form="corrected")
    x = torch.exp(lp - old) * R
    cl = torch.clamp(x, 0.8, 1.2)
    # faithful: −min(ρR·A, clip(ρR)·R·A); corrected: −min(ρR·A, clip(ρR)·A)
    close(vf, torch.where(m, torch.maximum(-A * x, -A * R * cl), 0.0))
    close(vc, torch.where(m, torch.maximum(-A * x, -A * cl), 0.0))
    # they differ only where the clipped branch is taken, and there by exactly the factor R
    take_f = m & (-A * R * cl > -A * x)
    take_c = m & (-A * cl > -A * x)
    both_unclipped = m & ~take_f & ~take_c
    assert torch.equal(vf[both_unclipped], vc[both_unclipped])
    both_clipped = take_f & take_c
    assert both_clipped.any() and both_unclipped.any()
    close(vf[both_clipped], (R.expand_as(vc) * vc)[both_clipped])
    # unfixed row (log_roff 0): identical
    assert torch.equal(vf[1], vc[1])
    # single-term losses: faithful = R × corrected
    for name in ("cispo", "reinforce_loss"):
        f, _, _ = run(name, lp, old, A, m, log_roff=lr, loss_form="faithful")
        c, _, _ = run(name, lp, old, A, m, log_roff=lr, loss_form="corrected")
        close(f, R * c)


@pytest.mark.parametrize("name", ALL)
def test_log_roff_never_receives_gradient(name):
    lp, old, A, m, lr = batch(5, per_seq_adv=(name == "gspo"))
    lr = lr.clone().requires_grad_(True)
    x = lp.clone().requires_grad_(True)
    loss, _ = get_policy_loss(name)(x, old, A, m, log_roff=lr, **GC_KW[name])
    loss.sum().backward()
    assert lr.grad is None
    assert x.grad is not None


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("garbage", [(-3.0, -7.0, 5.0), (float("nan"), float("inf"), float("nan")), (-float("inf"), 0.0, float("inf"))])
def test_padding_never_leaks(name, garbage):
    """Whatever sits on padding (finite junk, NaN, ±inf in logp / old_logp / advantages): the loss and the
    gradient are those of the clean batch, exactly 0 on padding, never NaN."""
    lp, old, A, m, lr = batch(9, per_seq_adv=(name == "gspo"))
    v, g, _ = run(name, lp, old, A, m, log_roff=lr, **GC_KW[name])
    lp2 = torch.where(m, lp, torch.full_like(lp, garbage[0]))
    old2 = torch.where(m, old, torch.full_like(old, garbage[1]))
    A2 = torch.where(m, A, torch.full_like(A, garbage[2]))
    v2, g2, met = run(name, lp2, old2, A2, m, log_roff=lr, **GC_KW[name])
    assert torch.equal(v2[~m], torch.zeros_like(v2[~m])) and torch.equal(g2[~m], torch.zeros_like(g2[~m]))
    assert torch.equal(v, v2) and torch.equal(g, g2)
    assert all(torch.isfinite(x) for k, x in met.items() if k != "bapo_pos_share")


def test_bad_values_fail_with_one_line_messages():
    lp, old, A, m, lr = batch(0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        get_policy_loss("ppo")(lp, old, A, m, clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="did you mean 'faithful'"):
        get_policy_loss("ppo")(lp, old, A, m, log_roff=lr, loss_form="faithfull")
    with pytest.raises(ValueError, match="ecpo_delta"):
        get_policy_loss("ecpo")(lp, old, A, m, ecpo_delta=0.0)
    with pytest.raises(ValueError, match="bapo_a_low"):
        get_policy_loss("bapo")(lp, old, A, m, bapo_a_low=0.9, bapo_b_low=0.6)
    with pytest.raises(ValueError, match="did you mean 'gspo'"):
        get_policy_loss("gpso")


@pytest.mark.parametrize("seed", range(20))
def test_bapo_bounds_random_configs_and_ties(seed):
    g = torch.Generator().manual_seed(100 + seed)
    B, T = 4, 6
    # ratios on a grid that hits candidate bounds exactly (ties: ρ == c must count as inside)
    x = (torch.randint(10, 40, (B, T), generator=g).to(D) * 0.05)
    a = torch.randn(B, T, generator=g, dtype=D) - 0.3
    m = torch.rand(B, T, generator=g) < 0.8
    kw = dict(bapo_rho0=float(torch.rand(1, generator=g)) * 0.8, bapo_a_low=0.6, bapo_a_high=1.2,
              bapo_b_low=0.6 + 0.02 * int(torch.randint(0, 20, (1,), generator=g)),
              bapo_b_high=1.2 + 0.05 * int(torch.randint(0, 40, (1,), generator=g)), bapo_delta_high=0.05, bapo_delta_low=0.02)
    want = ref.ref_bapo_bounds(x[m].tolist(), a[m].tolist(), kw["bapo_rho0"], 0.6, 1.2, kw["bapo_b_low"], kw["bapo_b_high"], 0.05, 0.02)
    got = bapo_bounds(x, a, m, **kw)
    assert got[:2] == pytest.approx(want[:2], abs=1e-12)
    assert got[2] == pytest.approx(want[2], rel=1e-10)


def test_config_keys_are_explicit_parameters():
    """Callers fill loss keywords from AlgoConfig by signature introspection: every AlgoConfig field a loss
    uses must be a named parameter, never hidden in **kwargs."""
    import dataclasses
    import inspect

    from rfpo_megatron.config import AlgoConfig

    fields = {f.name for f in dataclasses.fields(AlgoConfig)}
    uses = {
        "ppo": {"clip_ratio_low", "clip_ratio_high", "clip_ratio_c"},
        "raft_pp": {"clip_ratio_low", "clip_ratio_high", "clip_ratio_c"},
        "gspo": {"clip_ratio_low", "clip_ratio_high", "clip_ratio_c"},
        "gppo": {"clip_ratio_low", "clip_ratio_high", "clip_ratio_c"},
        "cispo": {"clip_ratio_low", "clip_ratio_high"},
        "aspo": {"clip_ratio_low", "clip_ratio_high", "clip_ratio_c"},
        "ecpo": {"clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "ecpo_delta"},
        "bapo": {"clip_ratio_c"} | {f for f in fields if f.startswith("bapo_")},
        "reinforce_loss": set(),
    }
    for name, keys in uses.items():
        params = inspect.signature(POLICY_LOSSES[name]).parameters
        assert keys <= fields, keys - fields
        assert keys <= set(params), (name, keys - set(params))
        assert {"log_roff", "loss_form"} <= set(params)


@pytest.mark.parametrize("name", ALL)
def test_zero_advantage_gives_zero_loss_and_gradient(name):
    """An all-equal group (advantage 0 everywhere) contributes nothing and never NaN, with or without R_off."""
    lp, old, A, m, lr = batch(4)
    z = torch.zeros_like(A)
    for kw in ({}, dict(log_roff=lr, loss_form="faithful"), dict(log_roff=lr, loss_form="corrected")):
        v, g, met = run(name, lp, old, z, m, **{**GC_KW[name], **kw})
        assert torch.equal(v.abs(), torch.zeros_like(v)) and torch.equal(g.abs(), torch.zeros_like(g))
        assert all(torch.isfinite(x) or torch.isnan(x) and k == "bapo_pos_share" for k, x in met.items())


def test_bapo_sums_add_across_micro_batches():
    """P, N are sums: adding them over any row split and picking gives the whole-batch bounds."""
    from rfpo_megatron.algos import bapo_candidate_sums, bapo_pick

    lp, old, A, m, _ = batch(2, B=6, spread=0.8)
    A = A - 0.5
    x = torch.exp(lp - old)
    cands, p, n = bapo_candidate_sums(x, A, m, **BAPO_KW)
    whole = bapo_pick(cands, p, n, 0.4)
    assert whole == bapo_bounds(x, A, m, **BAPO_KW)
    parts = [bapo_candidate_sums(x[r], A[r], m[r], **BAPO_KW) for r in ([0, 3], [1, 2, 5], [4])]
    p2 = sum(pp for _, pp, _ in parts)
    n2 = sum(nn for _, _, nn in parts)
    got = bapo_pick(cands, p2, n2, 0.4)
    assert got[:2] == whole[:2] and got[2] == pytest.approx(whole[2], rel=1e-12)
    assert whole[:2] != (0.6, 1.2)  # the bounds did move
