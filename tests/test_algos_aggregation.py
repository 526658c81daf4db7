"""Loss aggregation: plain references per mode, and micro-batch / DP split invariance of loss and gradients."""

import random
import zlib

import pytest
import torch

from rfpo_megatron.algos import LOSS_AGG_MODES, StepCounts, aggregate, compute_actor_loss, count_tokens_and_seqs

D = torch.float64


def ragged(seed, B=9, T=7):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T
    lens[3] = 0  # an empty (dropped) row: never counted as a sequence
    m = torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)
    return g, m


def ref_aggregate(L, m, mode, max_len=None):
    rows = [[float(L[i, t]) for t in range(L.shape[1]) if m[i, t]] for i in range(L.shape[0])]
    rows = [r for r in rows if r]
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / (len(rows) * max_len)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_matches_reference(mode, seed):
    g, m = ragged(seed)
    L = torch.randn(m.shape, generator=g, dtype=D)
    L = torch.where(m, L, torch.full_like(L, 1e6))  # padding must not count
    got = aggregate(L, m, mode, max_len=16)
    assert float(got) == pytest.approx(ref_aggregate(L, m, mode, 16), rel=1e-12)


def _splits(rng, n, k):
    perm = list(range(n))
    rng.shuffle(perm)
    cuts = sorted(rng.sample(range(1, n), k - 1))
    return [perm[a:b] for a, b in zip([0] + cuts, cuts + [n])]


def _sub(x, rows, T):
    return None if x is None else (x[rows, :T] if x.dim() == 2 else x[rows])


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("loss", ["ppo", "gspo", "cispo", "gppo", "aspo", "ecpo", "bapo", "reinforce_loss"])
def test_micro_batch_split_gives_same_loss_and_gradients(mode, loss):
    """Whole batch vs random splits into 2..4 micro-batches (rows permuted, each trimmed to its own max
    length), every add-on on, normalised by the summed StepCounts: same total and same gradients."""
    g, m = ragged(zlib.crc32(f"{mode}{loss}".encode()) % 1000)
    B, T = m.shape
    lp0 = -(0.1 + 2 * torch.rand(B, T, generator=g, dtype=D))
    old = lp0 + 0.4 * torch.randn(B, T, generator=g, dtype=D)
    rollout = old + 0.2 * torch.randn(B, T, generator=g, dtype=D)
    ref_lp = lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    ent0 = torch.rand(B, T, generator=g, dtype=D)
    A = torch.randn(B, 1, generator=g, dtype=D).expand(B, T).contiguous()
    log_roff = 0.5 * torch.randn(B, generator=g, dtype=D)
    is_fixed = torch.tensor([i % 3 == 0 for i in range(B)])
    log_roff = torch.where(is_fixed, log_roff, 0.0)
    is_pos = torch.tensor([i % 2 == 1 for i in range(B)])
    kw = dict(loss_agg_mode=mode, loss_agg_max_len=T + 3, loss_form="faithful", tis_cap=1.5, entropy_coeff=0.01,
              use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k3", pos_nll_coef=0.2, chord_mu=0.3,
              clip_ratio_c=3.0, bapo_clip_bounds=(0.7, 1.5), clip_ratio_low=0.2, clip_ratio_high=0.28)
    if loss == "gspo":
        kw.update(clip_ratio_low=0.05, clip_ratio_high=0.05)

    def total(rows_list):
        lp = lp0.clone().requires_grad_(True)
        ent = ent0.clone().requires_grad_(True)
        counts = sum((StepCounts.local(m[r], is_pos[r], is_fixed[r]) for r in rows_list), StepCounts(0, 0))
        out = 0.0
        for r in rows_list:
            t = max(1, int(m[r].sum(-1).max()))
            lval, _ = compute_actor_loss(
                loss, _sub(lp, r, t), _sub(old, r, t), _sub(A, r, t), _sub(m, r, t), counts=counts,
                log_roff=log_roff[r], is_fixed=is_fixed[r], rollout_logp=_sub(rollout, r, t), entropy=_sub(ent, r, t),
                ref_logp=_sub(ref_lp, r, t), is_positive=is_pos[r], **kw)
            lval.backward()
            out += float(lval.detach())
        return out, lp.grad, ent.grad

    whole, g_lp, g_ent = total([list(range(B))])
    rng = random.Random(0)
    for k in (2, 3, 4):
        split, s_lp, s_ent = total(_splits(rng, B, k))
        assert split == pytest.approx(whole, rel=1e-12, abs=1e-14)
        torch.testing.assert_close(s_lp, g_lp, rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(s_ent, g_ent, rtol=1e-11, atol=1e-14)
    assert g_lp.abs().sum() > 0


def test_default_counts_are_local_and_count_helper():
    _, m = ragged(4)
    assert count_tokens_and_seqs(m) == (int(m.sum()), int(m.any(-1).sum()))
    L = torch.ones(m.shape, dtype=D)
    assert float(aggregate(L, m, "token-mean")) == 1.0
    assert float(aggregate(L, m, "seq-mean-token-mean")) == 1.0
    # global counts: this micro-batch's share
    assert float(aggregate(L, m, "token-mean", global_num_tokens=2 * int(m.sum()))) == 0.5


def test_bad_mode_and_missing_max_len():
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="did you mean 'token-mean'"):
        aggregate(torch.ones(2, 3), m, "token_mean")
    with pytest.raises(ValueError, match="loss_agg_max_len"):
        aggregate(torch.ones(2, 3), m, "seq-mean-token-sum-norm")


def test_empty_batch_is_zero_not_nan():
    m = torch.zeros(2, 3, dtype=torch.bool)
    for mode in LOSS_AGG_MODES:
        assert float(aggregate(torch.ones(2, 3), m, mode, max_len=4)) == 0.0
