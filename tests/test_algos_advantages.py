"""Advantage estimators vs plain float64 loop references (ragged masks, G = 1, all-equal groups)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _algos_ref import groups_of, make_groups, ref_gae, ref_grpo, ref_reinforce_pp, ref_rloo, valid_positions  # noqa: E402

from rfpo_megatron.algos import ADV_ESTIMATORS, compute_advantages, sample_keep_mask  # noqa: E402
from rfpo_megatron.algos.advantages import ESTIMATOR_NAMES  # noqa: E402

SEEDS = [0, 1, 2, 3]


def _expand(per_seq, mask):
    return torch.tensor([[per_seq[i] if mask[i][t] else 0.0 for t in range(mask.shape[1])] for i in range(mask.shape[0])], dtype=torch.float64)


def test_registry_lists_every_estimator():
    assert set(ESTIMATOR_NAMES) == set(ADV_ESTIMATORS)
    assert set(ADV_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "reinforce_pp_baseline", "remax", "gae", "reinforce_rej", "raft"}


def test_grpo_hand_case_g8():
    r = torch.tensor([1.0] + [0.0] * 7)
    adv, _ = compute_advantages("grpo", rewards=r, group_ids=torch.zeros(8, dtype=torch.long), response_mask=torch.ones(8, 3, dtype=torch.bool))
    # mean 1/8, unbiased std sqrt(1/8) -> (7/8)/0.35355 = 2.4749, (-1/8)/0.35355 = -0.35355
    assert adv[0, 0].item() == pytest.approx(2.4749, abs=1e-4)
    assert torch.allclose(adv[1:], torch.full((7, 3), -0.35355), atol=1e-4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_and_dr_grpo_match_reference(seed, norm):
    r, ids, m = make_groups(seed)
    name = "grpo" if norm else "dr_grpo"
    adv, ret = compute_advantages(name, rewards=r, group_ids=ids, response_mask=m)
    want = _expand(ref_grpo(r, ids, norm=norm), m)
    torch.testing.assert_close(adv, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(adv, ret)
    # norm_adv_by_std=False on grpo is dr_grpo
    adv2, _ = compute_advantages("grpo", rewards=r, group_ids=ids, response_mask=m, norm_adv_by_std=norm)
    torch.testing.assert_close(adv2, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_matches_reference(seed):
    r, ids, m = make_groups(seed)
    adv, _ = compute_advantages("rloo", rewards=r, group_ids=ids, response_mask=m)
    torch.testing.assert_close(adv, _expand(ref_rloo(r, ids), m), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_rej", "reinforce_pp_baseline"])
def test_constant_groups_and_singletons_give_exact_zero(name):
    # awkward constants whose float mean is not exactly the value; G = 1 groups; never NaN
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3], dtype=torch.float32)
    ids = torch.tensor([5, 5, 5, 9, 2, 2, 2, 2, 2, 2, 2])
    m = torch.ones(11, 4, dtype=torch.bool)
    adv, ret = compute_advantages(name, rewards=r, group_ids=ids, response_mask=m)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    if name == "reinforce_pp_baseline":  # centred rewards all 0 and no KL -> returns 0, whitened 0
        assert torch.equal(ret, torch.zeros_like(ret))
    assert torch.equal(adv, torch.zeros_like(adv))


def test_reinforce_is_raw_reward():
    r, ids, m = make_groups(5)
    adv, _ = compute_advantages("reinforce", rewards=r, group_ids=ids, response_mask=m)
    torch.testing.assert_close(adv, _expand([float(x) for x in r], m), rtol=0, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_reference(seed, kind, gamma):
    r, ids, m = make_groups(seed)
    m[0, 3] = False  # a hole inside the (full-length) first response
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(m.shape, generator=g, dtype=torch.float64) * 3
    ref = old + 0.3 * torch.randn(m.shape, generator=g, dtype=torch.float64)
    adv, ret = compute_advantages("reinforce_pp", rewards=r, group_ids=ids, response_mask=m, old_logp=old, ref_logp=ref,
                                  kl_in_reward_coef=0.05, kl_in_reward_type=kind, gamma=gamma)
    want_adv, want_ret = ref_reinforce_pp(r, m.tolist(), old.tolist(), ref.tolist(), 0.05, kind, gamma)
    torch.testing.assert_close(ret, torch.tensor(want_ret, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adv, torch.tensor(want_adv, dtype=torch.float64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_pp_baseline_matches_reference(seed):
    r, ids, m = make_groups(seed)
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(m.shape, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(m.shape, generator=g, dtype=torch.float64)
    centred = []
    grp = groups_of(ids)
    for i in range(len(r)):
        vals = [float(r[j]) for j in next(idx for idx in grp.values() if i in idx)]
        centred.append(0.0 if max(vals) == min(vals) else float(r[i]) - sum(vals) / len(vals))
    adv, ret = compute_advantages("reinforce_pp_baseline", rewards=r, group_ids=ids, response_mask=m, old_logp=old,
                                  ref_logp=ref, kl_in_reward_coef=0.1, kl_in_reward_type="k3")
    want_adv, want_ret = ref_reinforce_pp(centred, m.tolist(), old.tolist(), ref.tolist(), 0.1, "k3", 1.0)
    torch.testing.assert_close(ret, torch.tensor(want_ret, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adv, torch.tensor(want_adv, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_remax():
    r, ids, m = make_groups(3)
    base = torch.linspace(-1, 1, len(r), dtype=torch.float64)
    adv, ret = compute_advantages("remax", rewards=r, group_ids=ids, response_mask=m, baseline_rewards=base)
    torch.testing.assert_close(adv, _expand([float(r[i] - base[i]) for i in range(len(r))], m), rtol=0, atol=1e-15)
    torch.testing.assert_close(ret, _expand([float(x) for x in r], m), rtol=0, atol=0)
    with pytest.raises(ValueError, match="baseline_rewards"):
        compute_advantages("remax", rewards=r, group_ids=ids, response_mask=m)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_reference(seed, gamma, lam):
    r, ids, m = make_groups(seed)
    m[1, 2] = False  # a hole inside a response: skipped, as if absent
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(m.shape, generator=g, dtype=torch.float64)
    adv, ret = compute_advantages("gae", rewards=r, group_ids=ids, response_mask=m, values=v, gamma=gamma, lam=lam, whiten=False)
    want = torch.tensor(ref_gae(r, m.tolist(), v.tolist(), gamma, lam), dtype=torch.float64)
    torch.testing.assert_close(adv, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, torch.where(m, want + v, 0.0), rtol=1e-12, atol=1e-12)
    # decoupled critic lambda (VAPO): returns use critic_lam, advantages use lam
    adv2, ret2 = compute_advantages("gae", rewards=r, group_ids=ids, response_mask=m, values=v, gamma=gamma, lam=lam, critic_lam=1.0, whiten=False)
    want_c = torch.tensor(ref_gae(r, m.tolist(), v.tolist(), gamma, 1.0), dtype=torch.float64)
    torch.testing.assert_close(adv2, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret2, torch.where(m, want_c + v, 0.0), rtol=1e-12, atol=1e-12)
    # whitened: zero mean, unit (unbiased) variance over valid tokens
    adv3, _ = compute_advantages("gae", rewards=r, group_ids=ids, response_mask=m, values=v, gamma=gamma, lam=lam)
    vals = adv3[m]
    assert abs(vals.mean().item()) < 1e-12 and abs(vals.var().item() - 1) < 1e-6


def test_reinforce_rej_and_keep_mask():
    r, ids, m = make_groups(1)
    adv, _ = compute_advantages("reinforce_rej", rewards=r, group_ids=ids, response_mask=m)
    keep = sample_keep_mask("reinforce_rej", r, ids)
    for idx in groups_of(ids).values():
        vals = [float(r[i]) for i in idx]
        constant = max(vals) == min(vals)
        for i in idx:
            assert bool(keep[i]) == (not constant)
            want = 0.0 if constant else 2.0 * float(r[i]) - 1.0  # the paper's ±1 reward
            assert all(float(adv[i, t]) == pytest.approx(want, abs=1e-6) for t in valid_positions(m[i]))
    assert torch.equal(sample_keep_mask("grpo", r, ids), torch.ones_like(keep))


def test_raft_keeps_group_max():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.2])
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    m = torch.ones(7, 2, dtype=torch.bool)
    adv, _ = compute_advantages("raft", rewards=r, group_ids=ids, response_mask=m)
    assert adv[:, 0].tolist() == [1, 0, 1, 0, 0, 1, 0]  # the all-wrong group 1 keeps nothing
    assert sample_keep_mask("raft", r, ids).tolist() == [True, False, True, False, False, True, False]
    adv, _ = compute_advantages("raft", rewards=r, group_ids=ids, response_mask=m, raft_min_reward=1.0)
    assert adv[:, 0].tolist() == [1, 0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce", "reinforce_rej", "raft", "dr_grpo"])
def test_padding_is_zero_and_dtype(name):
    r, ids, m = make_groups(2)
    adv, ret = compute_advantages(name, rewards=r.float(), group_ids=ids, response_mask=m)
    assert adv.dtype == torch.float32 and torch.equal(adv[~m], torch.zeros_like(adv[~m]))
    adv_i, _ = compute_advantages(name, rewards=(r * 4).long(), group_ids=ids, response_mask=m)
    assert adv_i.dtype == torch.float32


def test_unknown_estimator_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'grpo'"):
        compute_advantages("grpoo", rewards=torch.zeros(2), group_ids=torch.zeros(2, dtype=torch.long), response_mask=torch.ones(2, 1))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_reward", [None, 0.5])
def test_raft_matches_reference(seed, min_reward):
    r, ids, m = make_groups(seed)
    adv, _ = compute_advantages("raft", rewards=r, group_ids=ids, response_mask=m, raft_min_reward=min_reward)
    keep = sample_keep_mask("raft", r, ids, raft_min_reward=min_reward)
    want = [0.0] * len(r)
    for idx in groups_of(ids).values():
        best = max(float(r[i]) for i in idx)
        for i in idx:
            want[i] = 1.0 if (float(r[i]) == best and float(r[i]) > 0
                              and (min_reward is None or float(r[i]) >= min_reward)) else 0.0
    torch.testing.assert_close(adv, _expand(want, m), rtol=0, atol=0)
    assert keep.tolist() == [w == 1.0 for w in want]


def test_issue14_raft_all_wrong_group_is_not_positive():
    """issue 14 fact 3: RAFT trains only on positively rewarded samples (was [1,1,1,1,1,0,1,0])."""
    r = torch.tensor([0, 0, 0, 0, 1, 0, 1, 0], dtype=torch.float32)
    ids = torch.tensor([0] * 4 + [1] * 4)
    m = torch.ones(8, 3, dtype=torch.bool)
    adv, _ = compute_advantages("raft", rewards=r, group_ids=ids, response_mask=m)
    assert adv[:, 0].tolist() == [0, 0, 0, 0, 1, 0, 1, 0]
    assert sample_keep_mask("raft", r, ids).tolist() == [False] * 4 + [True, False, True, False]


def test_issue14_reinforce_rej_pushes_down_wrong_answers():
    """issue 14 fact 3: with {0,1} rewards Reinforce-Rej must not become positive-only: rewards are mapped to the
    paper's ±1 (wrong −1, correct +1); all-0 and all-1 groups are dropped."""
    r = torch.tensor([0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1], dtype=torch.float32)
    ids = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    m = torch.ones(12, 2, dtype=torch.bool)
    adv, _ = compute_advantages("reinforce_rej", rewards=r, group_ids=ids, response_mask=m)
    assert adv[:, 0].tolist() == [0] * 4 + [1, -1, 1, -1] + [0] * 4
    assert sample_keep_mask("reinforce_rej", r, ids).tolist() == [False] * 4 + [True] * 4 + [False] * 4
