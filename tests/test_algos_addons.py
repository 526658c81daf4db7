"""KL k1/k2/k3 (loss and in-reward), TIS, CHORD-φ, VAPO NLL, entropy, the composed actor objective, DAPO
shaping / dynamic sampling, and the registries."""

import math
import subprocess
import sys

import pytest
import torch
from algos_helpers import apply_kl_in_reward, dynamic_sampling_continue, dynamic_sampling_filter

from rfpo_megatron.algos import (
    ADV_ESTIMATORS,
    POLICY_LOSSES,
    chord_sft_loss,
    compute_actor_loss,
    get_adv_estimator,
    kl_estimate,
    kl_loss,
    overlong_penalty,
    pos_nll_loss,
    register_policy_loss,
    tis_weight,
)
from rfpo_megatron.algos.registry import POLICY_LOSSES as REG

D = torch.float64


def test_import_line_lists_every_name():
    out = subprocess.run(
        [sys.executable, "-c", "from rfpo_megatron.algos import ADV_ESTIMATORS, POLICY_LOSSES; print(sorted(ADV_ESTIMATORS)); print(sorted(POLICY_LOSSES))"],
        capture_output=True, text=True, check=True,
    ).stdout
    for n in "grpo dr_grpo rloo reinforce reinforce_pp reinforce_pp_baseline remax gae reinforce_rej raft".split():
        assert f"'{n}'" in out.splitlines()[0]
    for n in "ppo gspo cispo gppo aspo ecpo bapo reinforce_loss raft_pp".split():
        assert f"'{n}'" in out.splitlines()[1]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators(kind):
    lp = torch.tensor([[-1.0, -0.2, -3.0]], dtype=D)
    rf = torch.tensor([[-1.5, -0.2, -1.0]], dtype=D)
    got = kl_estimate(lp, rf, kind)
    for t in range(3):
        d = float(rf[0, t] - lp[0, t])
        want = {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[kind]
        assert float(got[0, t]) == pytest.approx(want, rel=1e-14, abs=1e-15)
    assert float(got[0, 1]) == 0.0  # equal policies
    m = torch.tensor([[True, True, False]])
    assert float(kl_loss(lp, rf, m, kind)[0, 2]) == 0.0
    with pytest.raises(ValueError, match="kl_loss_type"):
        kl_estimate(lp, rf, "k4")


def test_k3_gradient():
    lp = torch.tensor([-1.0, -2.0], dtype=D, requires_grad=True)
    rf = torch.tensor([-1.3, -1.0], dtype=D)
    kl_estimate(lp, rf, "k3").sum().backward()
    # d/dlogp [exp(ref−lp) − (ref−lp) − 1] = 1 − exp(ref − lp)
    torch.testing.assert_close(lp.grad, 1 - torch.exp(rf - lp.detach()))


def test_kl_in_reward():
    m = torch.tensor([[True, True, True, False], [True, False, False, False]])
    old = torch.tensor([[-1.0, -2.0, -0.5, 9.0], [-0.3, 9.0, 9.0, 9.0]], dtype=D)
    ref_lp = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.1, 0.0, 0.0, 0.0]], dtype=D)
    tok, met = apply_kl_in_reward(torch.tensor([1.0, 0.5], dtype=D), old, ref_lp, m, kl_in_reward_coef=0.1, kl_in_reward_type="k1")
    want = torch.tensor([[-0.05, 0.1, 1.0, 0.0], [0.5 + 0.02, 0.0, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(tok, want)
    assert float(met["kl_in_reward"]) == pytest.approx((0.5 - 1.0 + 0.0 - 0.2) / 4)


def test_tis_weight_never_on_fixed_rows():
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=D)
    roll = torch.tensor([[-2.0, -0.5], [-5.0, -5.0]], dtype=D)
    w = tis_weight(old, roll, 2.0, is_fixed=torch.tensor([False, True]))
    torch.testing.assert_close(w, torch.tensor([[2.0, math.exp(-0.5)], [1.0, 1.0]], dtype=D))
    with pytest.raises(ValueError, match="tis_cap"):
        tis_weight(old, roll, 0.0)


def test_chord_phi_weight_and_pos_nll():
    lp = torch.log(torch.tensor([[0.5, 0.9], [0.2, 0.7]], dtype=D)).requires_grad_(True)
    m = torch.ones(2, 2, dtype=torch.bool)
    sft = chord_sft_loss(lp, m, torch.tensor([True, False]))
    sft.sum().backward()
    # gradient −φ = −p(1−p) on fixed rows, 0 elsewhere
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.25, -0.09], [0.0, 0.0]], dtype=D))
    nll = pos_nll_loss(lp, m, torch.tensor([False, True]))
    torch.testing.assert_close(nll, torch.tensor([[0.0, 0.0], [-math.log(0.2), -math.log(0.7)]], dtype=D))


def test_actor_objective_composition_matches_manual_sum():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 5
    m = torch.arange(T).unsqueeze(0) < torch.tensor([5, 3, 1, 4]).unsqueeze(1)
    lp = -(0.1 + torch.rand(B, T, generator=g, dtype=D))
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    roll = old + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    rf = lp + 0.2 * torch.randn(B, T, generator=g, dtype=D)
    ent = torch.rand(B, T, generator=g, dtype=D)
    A = torch.randn(B, T, generator=g, dtype=D)
    fixed = torch.tensor([False, True, False, False])
    pos = torch.tensor([True, False, True, False])
    total, met = compute_actor_loss(
        "ppo", lp, old, A, m, loss_agg_mode="token-mean", is_fixed=fixed, rollout_logp=roll, tis_cap=2.0,
        entropy=ent, entropy_coeff=0.01, ref_logp=rf, use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k2",
        is_positive=pos, pos_nll_coef=0.3, chord_mu=0.25,
    )
    # manual, token by token
    pg = ent_s = kl_s = nll_s = sft_s = 0.0
    n = n_pos = n_fix = 0
    for i in range(B):
        for t in range(T):
            if not m[i, t]:
                continue
            n += 1
            rho = math.exp(float(lp[i, t] - old[i, t]))
            a = float(A[i, t])
            L = max(-a * rho, -a * min(max(rho, 0.8), 1.2))
            w = 1.0 if fixed[i] else min(math.exp(float(old[i, t] - roll[i, t])), 2.0)
            pg += L * w
            ent_s += float(ent[i, t])
            kl_s += 0.5 * float(rf[i, t] - lp[i, t]) ** 2
            if pos[i]:
                n_pos += 1
                nll_s += -float(lp[i, t])
            if fixed[i]:
                n_fix += 1
                p = math.exp(float(lp[i, t]))
                sft_s += -p * (1 - p) * float(lp[i, t])
    want = 0.75 * pg / n - 0.01 * ent_s / n + 0.1 * kl_s / n + 0.3 * nll_s / n_pos + 0.25 * sft_s / n_fix
    assert float(total) == pytest.approx(want, rel=1e-12)
    assert float(met["pg_loss"]) == pytest.approx(pg / n, rel=1e-12)


def test_actor_objective_missing_inputs_fail_clearly():
    x = torch.zeros(1, 2, dtype=D)
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="rollout_logp"):
        compute_actor_loss("ppo", x, x, x, m, tis_cap=2.0)
    with pytest.raises(ValueError, match="ref_logp"):
        compute_actor_loss("ppo", x, x, x, m, use_kl_loss=True)
    with pytest.raises(ValueError, match="is_positive"):
        compute_actor_loss("ppo", x, x, x, m, pos_nll_coef=0.1)
    with pytest.raises(ValueError, match="is_fixed"):
        compute_actor_loss("ppo", x, x, x, m, chord_mu=0.1)


def test_overlong_penalty_table():
    # L_max = 20, L_cache = 4: 0 up to 16, then (16 − |y|)/4, −1 beyond 20
    lens = torch.tensor([0, 10, 16, 17, 18, 20, 21, 100])
    got = overlong_penalty(lens, max_response_len=20, overlong_buffer_len=4, overlong_penalty_factor=1.0)
    assert got.tolist() == pytest.approx([0, 0, 0, -0.25, -0.5, -1.0, -1.0, -1.0])
    got = overlong_penalty(lens, max_response_len=20, overlong_buffer_len=4, overlong_penalty_factor=0.5)
    assert got.tolist() == pytest.approx([0, 0, 0, -0.125, -0.25, -0.5, -0.5, -0.5])
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_penalty(lens, max_response_len=20, overlong_buffer_len=0)


def test_dynamic_sampling_filter():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.3, 0.5])
    ids = torch.tensor([7, 7, 3, 3, 9, 9, 4, 11])  # groups: 7 all-1, 3 mixed, 9 all-0, 4 & 11 singletons
    res = dynamic_sampling_filter(r, ids)
    assert res.keep.tolist() == [False, False, True, True, False, False, False, False]
    assert (res.num_groups, res.num_kept_groups, res.num_dropped_groups) == (5, 1, 4)
    none = dynamic_sampling_filter(torch.zeros(3), torch.tensor([1, 1, 1]))
    assert none.num_kept_groups == 0 and none.num_dropped_groups == 1


def test_dynamic_sampling_continue_never_aborts():
    assert dynamic_sampling_continue(3, 8, 1, 3)
    assert not dynamic_sampling_continue(8, 8, 1, 3)  # enough groups
    assert not dynamic_sampling_continue(3, 8, 3, 3)  # bound hit: stop and train on what is there
    assert dynamic_sampling_continue(3, 8, 50, 0)  # 0 = unbounded


def test_registry_decorator_and_errors():
    @register_policy_loss("_test_tmp_loss")
    def f(logp, old_logp, advantages, response_mask, **_):
        return -advantages * logp, {}

    try:
        assert REG["_test_tmp_loss"] is f and POLICY_LOSSES["_test_tmp_loss"] is f
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("_test_tmp_loss")(lambda *a, **k: None)
    finally:
        del REG["_test_tmp_loss"]
    with pytest.raises(ValueError, match=r"config field 'algo.adv_estimator': 'rlooo' is not one of \[.*\] \(did you mean 'rloo'\?\)"):
        get_adv_estimator("rlooo")
    assert "grpo" in ADV_ESTIMATORS


def test_config_name_lists_match_the_registries():
    """config.py validates names against its own tuples; they must list exactly what algos implements."""
    from rfpo_megatron import config
    from rfpo_megatron.algos import KL_TYPES, LOSS_AGG_MODES, ROFF_MODES, LOSS_FORMS

    assert set(config.ADV_ESTIMATOR_NAMES) == set(ADV_ESTIMATORS)
    assert set(config.POLICY_LOSS_NAMES) == set(POLICY_LOSSES)
    assert set(config.LOSS_AGG_MODES) == set(LOSS_AGG_MODES)
    assert set(config.KL_TYPES) == set(KL_TYPES)
    rf = config.RFPOConfig()
    assert rf.roff_mode in ROFF_MODES and rf.loss_form in LOSS_FORMS


def test_objective_ignores_nan_padding():
    g = torch.Generator().manual_seed(1)
    B, T = 3, 4
    m = torch.arange(T).unsqueeze(0) < torch.tensor([4, 2, 1]).unsqueeze(1)
    lp = -(0.1 + torch.rand(B, T, generator=g, dtype=D))
    ins = dict(old=lp + 0.2, roll=lp + 0.1, ref=lp - 0.1, ent=torch.rand(B, T, generator=g, dtype=D), A=torch.randn(B, T, generator=g, dtype=D))

    def go(fill):
        f = {k: torch.where(m, v, torch.full_like(v, fill)) for k, v in ins.items()}
        x = torch.where(m, lp, torch.full_like(lp, fill)).requires_grad_(True)
        e = f["ent"].clone().requires_grad_(True)
        tot, _ = compute_actor_loss("cispo", x, f["old"], f["A"], m, rollout_logp=f["roll"], tis_cap=2.0, entropy=e,
                                    entropy_coeff=0.1, ref_logp=f["ref"], use_kl_loss=True, kl_loss_coef=0.1,
                                    is_fixed=torch.tensor([False, True, False]), is_positive=torch.tensor([True, False, True]),
                                    pos_nll_coef=0.2, chord_mu=0.3, log_roff=torch.tensor([0.0, 0.4, 0.0], dtype=D))
        tot.backward()
        return tot.detach(), x.grad, e.grad

    clean, nan = go(0.0), go(float("nan"))
    for a, b in zip(clean, nan):
        assert torch.equal(a, b)
