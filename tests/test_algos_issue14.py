"""Issue 14 reproductions and the RFPO weighted loss form, against hand-worked cases and float64 formulas.

* weighted-form gradient coefficients over R_off ∈ {0.3, 0.7, 0.9, 1.1, 1.3, 2, 7.39} for ppo, gspo, cispo, aspo
  (and the faithful / corrected coefficients, whose dead zones are issue 14 fact 5), at ρ = 1, A = +1;
* R_off ≡ 1 is the base loss bit for bit in every form, every loss;
* fact 8 (R_off overflow), fact 2 (KL in reward ignored / always on), fact 9 (k1+/k3+, k3 clamp),
  fact 10 (GSPO defaults), rfpo.wrong_advantage, knobs that cannot act.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _algos_ref as ref  # noqa: E402

from rfpo_megatron.algos import POLICY_LOSSES, compute_actor_loss, compute_log_roff  # noqa: E402
from rfpo_megatron.algos.kl import AdaptiveKLController, kl_estimate  # noqa: E402
from rfpo_megatron.config import ConfigError, load_config  # noqa: E402

GRID = [0.3, 0.7, 0.9, 1.1, 1.3, 2.0, 7.39]
D = torch.float64


def _coef(name, form, R, el, eh):
    """−∂L/∂logp at ρ = 1, A = +1 (the weight on ∇logp a fix with advantage +1 receives)."""
    lp = torch.zeros(1, 1, dtype=D, requires_grad=True)
    z, one, m = torch.zeros(1, 1, dtype=D), torch.ones(1, 1, dtype=D), torch.ones(1, 1, dtype=torch.bool)
    loss, _ = POLICY_LOSSES[name](lp, z, one, m, log_roff=torch.tensor([math.log(R)], dtype=D), loss_form=form,
                                  clip_ratio_low=el, clip_ratio_high=eh)
    loss.sum().backward()
    return -float(lp.grad)


def _want(name, form, R, el, eh):
    """The coefficient by hand (docs/algorithms.md table), ρ = 1, A = +1, x = ρ·R_off."""
    lo, hi = 1 - el, 1 + eh
    if form == "weighted":
        return R  # −sg(R)·min(ρA, clip(ρ)A) at ρ = 1 (inside the range): R·1; cispo/aspo: R·1 as well
    if name in ("ppo", "gspo"):
        if form == "faithful":  # −min(xA, clip(x)·R·A)
            if R < lo:
                return 0.0  # clip(x)·R = lo·R > x·1? no: lo·R < R → the clipped constant is the min
            return R * R if R < 1 else R  # R² on [lo, 1) (clipped branch inside the range), R above
        return R if lo <= R <= hi or R < lo else 0.0  # corrected: min(x, clip(x)); x > hi → clipped constant
    if name == "cispo":
        c = min(max(R, lo), hi)
        return c * R if form == "faithful" else c
    if name == "aspo":  # A > 0: frozen above hi; flipped weight 1/x otherwise: Ac / x
        if R > hi:
            return 0.0
        return R / R if form == "faithful" else 1.0 / R
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["ppo", "gspo", "cispo", "aspo"])
@pytest.mark.parametrize("form", ["weighted", "faithful", "corrected"])
def test_gradient_coefficient_table(name, form):
    el, eh = (3e-4, 4e-4) if name == "gspo" else (0.2, 0.28)
    got = [_coef(name, form, R, el, eh) for R in GRID]
    want = [_want(name, form, R, el, eh) for R in GRID]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_fact5_dead_zones_measured():
    """The numbers of issue 14 fact 5: faithful 0 at 0.3 and 0.7, R² on [0.8, 1); corrected 0 above 1.28;
    GSPO corrected zeroes every R_off ≠ 1 above; weighted never zeroes a fix."""
    f = [_coef("ppo", "faithful", R, 0.2, 0.28) for R in GRID]
    c = [_coef("ppo", "corrected", R, 0.2, 0.28) for R in GRID]
    assert f[:2] == [0.0, 0.0] and f[2] == pytest.approx(0.81)
    assert c[4:] == [0.0, 0.0, 0.0]
    for name in ("ppo", "gspo", "cispo", "aspo"):
        el, eh = (3e-4, 4e-4) if name == "gspo" else (0.2, 0.28)
        assert all(_coef(name, "weighted", R, el, eh) > 0 for R in GRID)


def _inputs(seed, B=5, T=6):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=D) * 2
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=D)
    A = torch.randn(B, 1, generator=g, dtype=D).expand(B, T).contiguous()
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, 4:] = False
    m[3, :2] = False
    return lp, old, A, m


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("form", ["faithful", "corrected", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_roff_one_is_bit_identical_to_the_base_loss(name, form, dtype):
    lp, old, A, m = (x.to(dtype) if x.is_floating_point() else x for x in _inputs(1))
    kw = dict(clip_ratio_c=3.0, bapo_clip_bounds=(0.7, 1.5))
    lp1 = lp.clone().requires_grad_(True)
    base, _ = POLICY_LOSSES[name](lp1, old, A, m, **kw)
    base.sum().backward()
    lp2 = lp.clone().requires_grad_(True)
    got, _ = POLICY_LOSSES[name](lp2, old, A, m, log_roff=torch.zeros(5, dtype=dtype), loss_form=form, **kw)
    got.sum().backward()
    assert torch.equal(got, base) and torch.equal(lp2.grad, lp1.grad)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_weighted_is_roff_times_the_base_loss(name):
    """weighted: L = sg(R_off)·L_base per token (value and gradient), R_off per sequence."""
    lp, old, A, m = _inputs(2)
    log_roff = torch.tensor([0.0, 1.5, -0.7, 2.0, 0.3], dtype=D)
    kw = dict(clip_ratio_c=3.0, bapo_clip_bounds=(0.7, 1.5), clip_ratio_low=0.2, clip_ratio_high=0.28)
    lp1 = lp.clone().requires_grad_(True)
    base, _ = POLICY_LOSSES[name](lp1, old, A, m, **kw)
    R = log_roff.exp().unsqueeze(-1)
    (base * R).sum().backward()
    lp2 = lp.clone().requires_grad_(True)
    got, _ = POLICY_LOSSES[name](lp2, old, A, m, log_roff=log_roff, loss_form="weighted", **kw)
    got.sum().backward()
    torch.testing.assert_close(got, base * R, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp2.grad, lp1.grad, rtol=1e-12, atol=1e-12)
    # and against the float64 per-token reference (ppo) for one token by hand
    if name == "ppo":
        v, gr = ref.ref_ppo_tok(float(lp[1, 0]), float(old[1, 0]), float(A[1, 0]), 1.0, "corrected", el=0.2, eh=0.28, c=3.0)
        assert float(got[1, 0].detach()) == pytest.approx(math.exp(1.5) * v, rel=1e-12)
        assert float(lp2.grad[1, 0]) == pytest.approx(math.exp(1.5) * gr, rel=1e-12)


# ------------------------------------------------------------------------------------------- fact 8: overflow
def test_fact8_roff_overflow_refused_by_config_and_guarded_in_the_loss():
    with pytest.raises(ConfigError, match="rfpo.roff_clip"):
        load_config(None, ["rfpo.roff_clip=1000", "rfpo.roff_mode=seq_sum"])
    load_config(None, ["rfpo.roff_clip=29.75"])
    # the reproduction: seq_sum, clip 1000, S(o) − S(o_f) = 100 → log R_off = 100 (R = 2.7e43 > fp32 max)
    pw = torch.full((2, 10), -1.0)  # the wrong answer o is far MORE likely under q than the fix: R_off > 1
    pf = torch.full((2, 10), -11.0)
    m = torch.ones(2, 10, dtype=torch.bool)
    lr = compute_log_roff(pw, m, pf, m, torch.tensor([True, False]), mode="seq_sum", gamma=1.0, clip=1000.0)
    assert float(lr[0]) == pytest.approx(100.0)
    for form in ("faithful", "corrected", "weighted"):
        for name in ("ppo", "cispo", "reinforce_loss", "aspo"):
            logp = (pf + 0.05).requires_grad_(True)
            total, _ = compute_actor_loss(name, logp, pf, torch.ones(2, 10), m, log_roff=lr, loss_form=form,
                                          clip_ratio_low=0.2, clip_ratio_high=0.28)
            total.backward()
            assert torch.isfinite(total) and torch.isfinite(logp.grad).all(), (name, form)


# ---------------------------------------------------------------------------------------------- fact 9: KL
def test_fact9_k3_is_clamped_like_verl():
    lp, rf = torch.tensor([0.0]), torch.tensor([30.0])  # Δ = 30: exp(30) − 31 unclamped
    assert float(kl_estimate(lp, rf, "k3")) == 10.0
    assert float(kl_estimate(torch.tensor([0.0]), torch.tensor([0.5]), "k3")) == pytest.approx(math.exp(0.5) - 1.5)


@pytest.mark.parametrize("base", ["k1", "k3"])
def test_fact9_straight_through_value_of_base_gradient_of_k2(base):
    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=D, requires_grad=True)
    rf = torch.tensor([-1.4, -1.0, -0.5], dtype=D)
    v = kl_estimate(lp, rf, base + "+")
    d = (rf - lp).detach()
    want_v = -d if base == "k1" else torch.expm1(d) - d
    torch.testing.assert_close(v.detach(), want_v, rtol=1e-12, atol=1e-12)
    v.sum().backward()
    torch.testing.assert_close(lp.grad, -d, rtol=1e-12, atol=1e-12)  # ∂(½Δ²)/∂logp = −Δ


# ------------------------------------------------------------------------------------- fact 2: KL in reward
def _step_batch(rewards, groups, lens, fixed=None):
    from rfpo_megatron.train.batch import StepBatch

    n = len(rewards)
    T = max(lens)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)
    fixed = fixed or [False] * n
    return StepBatch(prompt_ids=[[1, 2]] * n, response_ids=[[3] * L for L in lens], rollout_logp=[[-1.0] * L for L in lens],
                     rewards=torch.tensor(rewards, dtype=torch.float32), group_index=torch.tensor(groups),
                     is_fixed=torch.tensor(fixed), use_tis=torch.tensor([not f for f in fixed]), response_mask=mask,
                     fixed_rows=[i for i, f in enumerate(fixed) if f], orig_response_ids=[[3]] * sum(fixed),
                     num_groups=len(set(groups)))


def _logps(lens, seed):
    """[N, T] right-padded log-probs (the trainer's padded-once layout) of rows of these lengths."""
    from rfpo_megatron.actor.batch import pad_tokens

    g = torch.Generator().manual_seed(seed)
    return pad_tokens([-torch.rand(L, generator=g) for L in lens])


def test_fact2_kl_in_reward_off_means_off_even_with_a_reference_model():
    """use_kl_in_reward=false: reinforce_pp subtracts NO KL even though ref_logp exists (use_kl_loss=true)."""
    from rfpo_megatron.train.batch import advantages

    lens = [3, 5, 4, 2]
    cfg = load_config(None, ["algo.adv_estimator=reinforce_pp", "algo.use_kl_loss=true", "rfpo.enabled=false"])
    b = _step_batch([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], lens)
    old, ref_lp = _logps(lens, 1), _logps(lens, 2)
    a_with_ref = advantages(cfg, b, old, ref_lp).advantages
    b2 = _step_batch([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], lens)
    a_no_kl = advantages(cfg, b2, old, old).advantages  # ref = old: every KL estimate is 0
    torch.testing.assert_close(a_with_ref, a_no_kl, rtol=0, atol=0)


@pytest.mark.parametrize("kl_type", ["k1", "k3"])
def test_fact2_kl_in_reward_acts_for_grpo(kl_type):
    """GRPO with use_kl_in_reward: advantage of r_i − β·Σ_t k(old, ref)_t (verl), float64 reference."""
    from rfpo_megatron.train.batch import advantages

    lens = [3, 5, 4, 2, 6, 3]
    beta = 0.2
    cfg = load_config(None, ["algo.use_kl_in_reward=true", f"algo.kl_in_reward_coef={beta}",
                             f"algo.kl_in_reward_type={kl_type}", "rfpo.enabled=false"])
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    groups = [0, 0, 0, 1, 1, 1]
    old, ref_lp = _logps(lens, 3), _logps(lens, 4)
    metrics = {}
    adv = advantages(cfg, _step_batch(rewards, groups, lens), old, ref_lp, metrics=metrics).advantages
    seq = []
    for r, o, f, L in zip(rewards, old, ref_lp, lens):
        ks = [ref.ref_kl(float(a), float(b_), kl_type) for a, b_ in zip(o[:L].double(), f[:L].double())]
        seq.append(r - beta * sum(ks))
    want = ref.ref_grpo(seq, groups)
    for i, L in enumerate(lens):
        assert adv[i, :L].tolist() == pytest.approx([want[i]] * L, rel=1e-5, abs=1e-6)
    assert metrics["train/kl_in_reward_coef"] == beta
    # the all-1 group 1 has variance only through the KL: nonzero advantages now
    assert any(abs(want[i]) > 0 for i in (3, 4, 5))
    with pytest.raises(ConfigError, match="reference"):
        advantages(cfg, _step_batch(rewards, groups, lens), old, None)


def test_adaptive_kl_controller_matches_ppo_rule():
    c = AdaptiveKLController(0.1, target=0.02, horizon=1000)
    c.update(0.05, 64)  # error clipped to +0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 1000))
    c.update(0.019, 100)
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 1000) * (1 + (0.019 / 0.02 - 1) * 100 / 1000))
    f = AdaptiveKLController(0.1)
    f.update(5.0, 100)
    assert f.value == 0.1


def test_step_advantages_carries_the_adaptive_beta_in_counters():
    from rfpo_megatron.train.batch import step_advantages
    from rfpo_megatron.train.runtime import Runtime

    lens = [3, 4, 2, 5]
    cfg = load_config(None, ["algo.use_kl_in_reward=true", "algo.kl_in_reward_coef=0.1", "algo.kl_target=0.001",
                             "algo.kl_horizon=10", "rfpo.enabled=false"])
    rt = Runtime(cfg)
    old, ref_lp = _logps(lens, 5), _logps(lens, 6)
    step_advantages(rt, _step_batch([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], lens), old, ref_lp, None, {})
    # KL of these log-probs >> target: error clipped at +0.2, n = 4 sequences
    assert rt.counters["kl_in_reward_coef"] == pytest.approx(0.1 * (1 + 0.2 * 4 / 10))
    m = {}
    step_advantages(rt, _step_batch([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], lens), old, ref_lp, None, m)
    assert m["train/kl_in_reward_coef"] == pytest.approx(0.1 * (1 + 0.2 * 4 / 10))


# --------------------------------------------------------------------------------- fact 10 and config knobs
def test_fact10_gspo_uses_its_own_defaults_unless_set():
    a = load_config(None, ["algo.policy_loss=gspo"]).algo
    assert (a.clip_ratio_low, a.clip_ratio_high, a.loss_agg_mode) == (3e-4, 4e-4, "seq-mean-token-mean")
    a = load_config(None, ["algo.policy_loss=gspo", "algo.clip_ratio_high=1e-3", "algo.loss_agg_mode=token-mean"]).algo
    assert (a.clip_ratio_low, a.clip_ratio_high, a.loss_agg_mode) == (3e-4, 1e-3, "token-mean")
    a = load_config(None, []).algo
    assert (a.clip_ratio_low, a.clip_ratio_high, a.loss_agg_mode) == (0.2, 0.2, "token-mean")


def test_defaults_weighted_form_and_dr_grpo_lmax():
    cfg = load_config(None, [])
    assert cfg.rfpo.loss_form == "weighted" and cfg.rfpo.wrong_advantage == "group"


@pytest.mark.parametrize("override,field", [
    ("algo.norm_adv_by_std=false", "algo.norm_adv_by_std"),  # grpo only (here: rloo)
    ("algo.kl_loss_coef=0.1", "algo.kl_loss_coef"),  # without use_kl_loss
    ("algo.kl_in_reward_coef=0.1", "algo.kl_in_reward_coef"),  # without use_kl_in_reward
    ("algo.ecpo_delta=0.2", "algo.ecpo_delta"),
    ("algo.bapo_rho0=0.5", "algo.bapo_rho0"),
    ("algo.loss_agg_max_len=100", "algo.loss_agg_max_len"),
    ("algo.lam=0.9", "algo.lam"),
])
def test_knobs_that_cannot_act_are_refused(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ".*no effect"):
        load_config(None, ["algo.adv_estimator=rloo", override])


def test_clip_ratio_c_refused_where_there_is_no_dual_clip():
    with pytest.raises(ConfigError, match="clip_ratio_c"):
        load_config(None, ["algo.policy_loss=cispo", "algo.clip_ratio_c=3.0"])
    load_config(None, ["algo.policy_loss=ppo", "algo.clip_ratio_c=3.0"])


def test_wrong_advantage_zero_silences_the_wrong_samples_of_fixed_groups():
    from rfpo_megatron.train.batch import advantages

    lens = [3, 3, 3, 3, 2, 2]
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # group 0: row 0 is a placed fix; group 1: no fix
    groups = [0, 0, 0, 0, 1, 1]
    fixed = [True, False, False, False, False, False]
    old = _logps(lens, 7)
    a_group = advantages(load_config(None, []), _step_batch(rewards, groups, lens, fixed), old, None).advantages
    a_zero = advantages(load_config(None, ["rfpo.wrong_advantage=zero"]), _step_batch(rewards, groups, lens, fixed), old,
                        None).advantages
    g = ref.ref_grpo(rewards, groups)
    assert a_group[:, 0].tolist() == pytest.approx(g, abs=1e-5)
    assert a_zero[:, 0].tolist() == pytest.approx([g[0], 0.0, 0.0, 0.0, g[4], g[5]], abs=1e-5)
