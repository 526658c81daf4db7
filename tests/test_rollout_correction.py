"""Rollout correction (algo.rollout_correction): every mode and chains against hand-worked values and a pure-
Python float64 reference; icepop / seq_mask_tis mask exactly the tokens / sequences their definitions say; the
trainer's step construction (make_step -> Step.actor_batch -> update_policy -> actor.train_step) hands the actor
the weights and loss mask each knob's formula gives; fixed rows are never corrected; config errors."""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from rfpo_megatron import train as T
from rfpo_megatron.actor.batch import pad_tokens
from rfpo_megatron.algos import ROLLOUT_CORRECTIONS, apply_rollout_correction, compute_actor_loss
from rfpo_megatron.config import ROLLOUT_CORRECTION_MODES, ConfigError, load_config
from rfpo_megatron.data.types import RolloutGroup, Sample

KNOBS = dict(tis_cap=1.2, icepop_low=0.5, icepop_high=2.0, seq_mask_low=0.9, seq_mask_high=1.1, seq_is_cap=2.0,
             reject_kl_type="k3", token_reject_threshold=1.0, seq_reject_threshold=0.05)


def run(modes, rows, **kw):
    """rows: lists of log-ratios lr (old = lr, rollout = 0); ragged rows are padded (not eligible)."""
    L = max(len(r) for r in rows)
    old = torch.zeros(len(rows), L, dtype=torch.float64)
    elig = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        old[i, :len(r)] = torch.tensor(r, dtype=torch.float64)
        elig[i, :len(r)] = True
    w, keep, met = apply_rollout_correction(modes, old, torch.zeros_like(old), elig, **{**KNOBS, **kw})
    return w, keep, met


def k_ref(x, t):
    return {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - 1 - x}[t]


def reference(modes, rows, kn):
    """Pure-Python float64 chain: per row (weights, keep) lists."""
    out = []
    for r in rows:
        w, keep = [1.0] * len(r), [True] * len(r)
        for m in modes:
            kept = [x for x, k in zip(r, keep) if k]
            mean = sum(kept) / len(kept) if kept else 0.0
            if m in ("tis", "seq_mask_tis"):
                w = [a * min(math.exp(x), kn["tis_cap"]) for a, x in zip(w, r)]
            if m == "icepop":
                keep = [k and kn["icepop_low"] <= math.exp(x) <= kn["icepop_high"] for k, x in zip(keep, r)]
            if m == "seq_mask_tis" and not kn["seq_mask_low"] <= math.exp(mean) <= kn["seq_mask_high"]:
                keep = [False] * len(r)
            if m == "seq_is":
                w = [a * min(math.exp(sum(kept)), kn["seq_is_cap"]) for a in w]
            if m == "token_reject":
                keep = [k and abs(k_ref(x, kn["reject_kl_type"])) <= kn["token_reject_threshold"] for k, x in zip(keep, r)]
            if m == "seq_reject":
                ks = [k_ref(x, kn["reject_kl_type"]) for x, k in zip(r, keep) if k]
                if ks and abs(sum(ks) / len(ks)) > kn["seq_reject_threshold"]:
                    keep = [False] * len(r)
        out.append((w, keep))
    return out


def test_registry_matches_config_names():
    assert sorted(ROLLOUT_CORRECTIONS) == sorted(ROLLOUT_CORRECTION_MODES)


def test_tis_hand_values():
    w, keep, met = run(["tis"], [[0.1, -0.5, 0.3]])
    assert w[0].tolist() == pytest.approx([math.exp(0.1), math.exp(-0.5), 1.2], rel=1e-7)  # e^0.3 = 1.35 > C
    assert keep.all() and "tis_masked_frac" not in met


def test_icepop_masks_exactly_tokens_outside_band():
    rho = [0.3, 0.6, 1.0, 1.9, 2.5, 0.49, 2.01]
    w, keep, met = run(["icepop"], [[math.log(x) for x in rho]])
    assert w is None
    assert keep[0].tolist() == [False, True, True, True, False, False, False]
    assert met["icepop_masked_frac"] == pytest.approx(4 / 7)
    # the band edges themselves stay (ρ = 1 exactly: lr = 0; a tighter band around 1 masks every other token)
    _, keep, _ = run(["icepop"], [[0.0, 0.01, -0.01]], icepop_low=1.0, icepop_high=1.0 + 1e-9)
    assert keep[0].tolist() == [True, False, False]


def test_seq_mask_tis_masks_exactly_sequences_outside_band():
    rows = [[0.1, -0.1, 0.0], [0.3, 0.3], [-0.2, -0.2, -0.2, -0.2], [0.5, -0.4]]
    # geometric means: e^0 = 1, e^0.3 = 1.35, e^-0.2 = 0.82, e^0.05 = 1.05 -> band [0.9, 1.1] keeps rows 0 and 3
    w, keep, met = run(["seq_mask_tis"], rows)
    assert [bool(keep[i, :len(r)].all()) for i, r in enumerate(rows)] == [True, False, False, True]
    assert not keep[1, :2].any() and not keep[2].any()
    assert w[0, :3].tolist() == pytest.approx([math.exp(0.1), math.exp(-0.1), 1.0], rel=1e-7)
    assert w[3, :2].tolist() == pytest.approx([1.2, math.exp(-0.4)], rel=1e-7)  # e^0.5 = 1.65 capped at C
    assert met["seq_mask_tis_seq_frac"] == pytest.approx(2 / 4)
    assert met["seq_mask_tis_masked_frac"] == pytest.approx(6 / 11)


def test_seq_is_hand_values():
    w, keep, _ = run(["seq_is"], [[0.2, 0.3], [0.5, 0.6], [-1.0, 0.2]])
    assert w[0].tolist() == pytest.approx([math.exp(0.5)] * 2, rel=1e-7)
    assert w[1].tolist() == pytest.approx([2.0, 2.0])  # e^1.1 = 3.0 capped
    assert w[2].tolist() == pytest.approx([math.exp(-0.8)] * 2, rel=1e-7)
    assert keep.all()


@pytest.mark.parametrize("kl,thr,want", [
    ("k1", 1.0, [True, True, False, False, True]),    # |−lr| <= 1
    ("k2", 0.1, [False, False, False, False, True]),  # ½lr² = .125 .125 .72 .72 .00125
    ("k3", 0.12, [False, True, False, False, True]),  # e^lr−1−lr = .149 .107 2.12 .501 .0013 (asymmetric)
])
def test_token_reject_by_k(kl, thr, want):
    _, keep, met = run(["token_reject"], [[0.5, -0.5, 1.2, -1.2, 0.05]], reject_kl_type=kl, token_reject_threshold=thr)
    assert keep[0].tolist() == want
    assert met["token_reject_masked_frac"] == pytest.approx(want.count(False) / 5)


@pytest.mark.parametrize("kl,thr,want", [
    ("k1", 0.2, [True, True, False]),    # |mean −lr| = 0, 0.1, 0.3
    ("k2", 0.046, [True, False, True]),  # mean ½lr² = .045, .05, .045
    ("k3", 0.047, [True, False, False]),  # mean e^lr−1−lr = .0453, .0553, .0499
])
def test_seq_reject_by_k(kl, thr, want):
    rows = [[0.3, -0.3], [0.4, -0.2], [0.3, 0.3]]
    _, keep, met = run(["seq_reject"], rows, reject_kl_type=kl, seq_reject_threshold=thr)
    assert [bool(keep[i].all()) for i in range(3)] == want
    assert not any(bool(keep[i].any()) for i in range(3) if not want[i])  # the whole sequence goes
    assert met["seq_reject_seq_frac"] == pytest.approx(want.count(False) / 3)


def test_chain_order_matters_for_sequence_statistics():
    row = [[math.log(3.0), 0.0, 0.0]]
    _, keep, _ = run(["icepop", "seq_mask_tis"], row)  # icepop drops ρ=3, the rest has geometric mean 1: kept
    assert keep[0].tolist() == [False, True, True]
    _, keep, _ = run(["seq_mask_tis", "icepop"], row)  # geometric mean 3^(1/3) = 1.44 > 1.1: row masked
    assert keep[0].tolist() == [False, False, False]


def test_tis_icepop_chain_is_icepop_objective():
    lr = [math.log(x) for x in (0.3, 0.8, 1.1, 1.8, 2.6)]
    w, keep, met = run(["tis", "icepop"], [lr], tis_cap=2.0)
    assert keep[0].tolist() == [False, True, True, True, False]
    assert w[0, 1:4].tolist() == pytest.approx([0.8, 1.1, 1.8], rel=1e-7)  # = ρ inside the band (C >= high)
    assert met["rollout_logprob_gap_max"] == pytest.approx(math.log(0.3) * -1)
    assert met["rollout_logprob_gap_mean"] == pytest.approx(sum(abs(x) for x in lr) / 5)
    assert met["kept_frac"] == pytest.approx(3 / 5)


@pytest.mark.parametrize("modes", [[m] for m in ROLLOUT_CORRECTION_MODES] + [
    ["tis", "icepop"], ["icepop", "seq_mask_tis"], ["token_reject", "seq_is", "seq_reject"],
    ["seq_is", "tis", "icepop", "token_reject", "seq_reject"]])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_vs_float64_reference(modes, kl):
    rnd = random.Random(hash((tuple(modes), kl)) % 1000)
    rows = [[rnd.gauss(0, 0.4) for _ in range(rnd.randint(1, 7))] for _ in range(12)]
    kn = {**KNOBS, "reject_kl_type": kl, "token_reject_threshold": 0.08, "seq_reject_threshold": 0.03,
          "seq_mask_low": 0.95, "seq_mask_high": 1.05, "icepop_low": 0.7, "icepop_high": 1.4}
    w, keep, met = run(modes, rows, **kn)
    for i, (rw, rk) in enumerate(reference(modes, rows, kn)):
        n = len(rows[i])
        assert keep[i, :n].tolist() == rk
        if w is not None:
            got = [x for x, k in zip(w[i, :n].tolist(), rk) if k]
            assert got == pytest.approx([x for x, k in zip(rw, rk) if k], rel=1e-6)
            assert w[i, n:].eq(1).all()
        assert keep[i, n:].all()  # padding is not eligible: untouched
    assert met["kept_frac"] == pytest.approx(sum(sum(k) for _, k in reference(modes, rows, kn)) / sum(map(len, rows)))


# ----------------------------------------------------------------------------------- through the trainer

def _groups():
    """One group: 3 engine samples (rollout log-probs -1) and a fixed sample (use_tis False)."""
    s = [Sample(prompt_ids=[1, 2], response_ids=[5 + i] * n, rollout_logprobs=[-1.0] * n, reward=float(i == 0))
         for i, n in enumerate((3, 2, 4))]
    s.append(Sample(prompt_ids=[1, 2], response_ids=[9, 9, 9], rollout_logprobs=[-3.0] * 3, reward=1.0,
                    is_fixed=True, fixed_from=[7, 7], use_tis=False))
    return [RolloutGroup(prompt_ids=[1, 2], samples=s)]


# old log-probs: row lr = old − (−1); fixed row lr would be huge (its rollout log-probs are under the fix prompt)
OLD = [[-1 + 0.1, -1 - 0.8, -1 + 0.9], [-1 + 0.02, -1 - 0.04], [-1 + 0.3, -1 + 0.3, -1 + 0.2, -1 + 0.4],
       [-0.5, -0.5, -0.5]]
LR = [[0.1, -0.8, 0.9], [0.02, -0.04], [0.3, 0.3, 0.2, 0.4]]


def _step_batch(*over):
    cfg = load_config(None, list(over))
    batch = T.build_batch(_groups())
    old = pad_tokens([torch.tensor(r) for r in OLD], dtype=torch.float32)
    adv = T.Advantages(torch.ones(batch.response_mask.shape), batch.response_mask.clone())
    step = T.make_step(cfg, batch, old, None, None, torch.zeros(batch.n), adv)
    seen = []
    rt = SimpleNamespace(cfg=cfg, actor=SimpleNamespace(train_step=lambda b, a, r: seen.append(b) or {"train/loss": 0.0}))
    T.update_policy(rt, step)  # the trainer's real path to actor.train_step
    return step, seen[0], cfg


def _expect(cfg_over):
    kn = dict(KNOBS, tis_cap=None)
    modes = []
    for o in cfg_over:
        k, v = o.split("=", 1)
        k = k.split(".")[-1]
        if k == "modes":
            modes = v.strip("[]").split(",")
        else:
            kn[k] = v if k == "reject_kl_type" else float(v)
    if not modes and kn["tis_cap"] is not None:
        modes = ["tis"]
    return reference(modes, [[float(torch.tensor(x, dtype=torch.float32)) + 1.0 for x in r] for r in OLD[:3]], kn)


RC = "algo.rollout_correction."
KNOB_CASES = [  # (baseline overrides, the same with one knob changed)
    (["algo.tis_cap=2.0"], ["algo.tis_cap=1.3"]),
    ([RC + "modes=[icepop]"], [RC + "modes=[icepop]", RC + "icepop_low=0.3"]),
    ([RC + "modes=[icepop]"], [RC + "modes=[icepop]", RC + "icepop_high=2.6"]),
    ([RC + "modes=[seq_mask_tis]", "algo.tis_cap=2.0"], [RC + "modes=[seq_mask_tis]", "algo.tis_cap=2.0", RC + "seq_mask_low=1.0"]),
    ([RC + "modes=[seq_mask_tis]", "algo.tis_cap=2.0"], [RC + "modes=[seq_mask_tis]", "algo.tis_cap=2.0", RC + "seq_mask_high=1.4"]),
    ([RC + "modes=[seq_is]"], [RC + "modes=[seq_is]", RC + "seq_is_cap=3.0"]),
    ([RC + "modes=[token_reject]"], [RC + "modes=[token_reject]", RC + "token_reject_threshold=0.3"]),
    ([RC + "modes=[token_reject]", RC + "token_reject_threshold=0.5"],
     [RC + "modes=[token_reject]", RC + "token_reject_threshold=0.5", RC + "reject_kl_type=k1"]),
    ([RC + "modes=[seq_reject]"], [RC + "modes=[seq_reject]", RC + "seq_reject_threshold=0.2"]),
    ([RC + "modes=[icepop]"], [RC + "modes=[icepop,token_reject]", RC + "token_reject_threshold=0.04"]),
]


@pytest.mark.parametrize("base,changed", KNOB_CASES)
def test_each_knob_changes_what_the_actor_receives(base, changed):
    got = []
    for over in (base, changed):
        step, ab, cfg = _step_batch(*over)
        want = _expect(over)
        for i in range(3):
            rw, rk = want[i]
            assert ab.response_mask[i].tolist() == rk
            if ab.tis_weights is not None:
                kept = [x for x, k in zip(ab.tis_weights[i].tolist(), rk) if k]
                assert kept == pytest.approx([x for x, k in zip(rw, rk) if k], rel=1e-6)
            else:
                assert all(x == 1.0 for x in rw)
        # the fixed row (3): never corrected, whatever its ratio
        assert ab.response_mask[3].all() and (ab.tis_weights is None or ab.tis_weights[3].eq(1).all())
        assert "train/rollout_logprob_gap_max" in step.correction_metrics
        got.append(([m.tolist() for m in ab.response_mask], None if ab.tis_weights is None else
                    [w.tolist() for w in ab.tis_weights]))
    assert got[0] != got[1]  # the knob changed the actor's inputs


def test_metrics_through_make_step():
    step, _, _ = _step_batch(RC + "modes=[icepop]", RC + "icepop_low=0.5", RC + "icepop_high=2.0")
    m = step.correction_metrics
    gaps = [abs(float(torch.tensor(x, dtype=torch.float32)) + 1.0) for r in OLD[:3] for x in r]
    assert m["train/rollout_logprob_gap_mean"] == pytest.approx(sum(gaps) / 9, rel=1e-6)
    assert m["train/rollout_logprob_gap_max"] == pytest.approx(max(gaps), rel=1e-6)
    assert m["train/rollout_correction/icepop_masked_frac"] == pytest.approx(2 / 9)  # ρ = e^-0.8 = 0.45, e^0.9 = 2.46


def test_masked_tokens_leave_the_loss_and_its_normaliser():
    """token-mean on the actor batch: Σ_kept w·(−A·ρ) / n_kept (ρ = 1 at logp = old), float64 by hand."""
    _, ab, _ = _step_batch(RC + "modes=[icepop,seq_is]")
    lp = pad_tokens(list(ab.old_logp)).double()
    m = pad_tokens(list(ab.response_mask), fill=False, dtype=torch.bool)
    w = pad_tokens(list(ab.tis_weights), fill=1.0).double()
    adv = pad_tokens(list(ab.advantages)).double()
    loss, _ = compute_actor_loss("ppo", lp, lp, adv, m, tis_weights=w, clip_ratio_low=0.2, clip_ratio_high=0.2)
    want = [-float(w[i, t]) * float(adv[i, t]) for i in range(4) for t in range(m.shape[1]) if m[i, t]]
    assert int(m.sum()) == 12 - 2  # the two icepop-masked tokens left the count
    assert float(loss) == pytest.approx(sum(want) / len(want), rel=1e-9)


# ------------------------------------------------------------------------------------------------ config

def test_tis_cap_alone_is_the_tis_mode():
    _, ab, _ = _step_batch("algo.tis_cap=2.0")
    assert ab.tis_weights[0].tolist() == pytest.approx([math.exp(0.1), math.exp(-0.8), 2.0], rel=1e-6)


@pytest.mark.parametrize("over,msg", [
    ([RC + "modes=[icepopp]"], "did you mean 'icepop'"),
    ([RC + "modes=[tis]"], "algo.tis_cap"),
    ([RC + "modes=[tis,seq_mask_tis]", "algo.tis_cap=2"], "already applies"),
    ([RC + "modes=[icepop,icepop]"], "twice"),
    ([RC + "modes=[icepop]", "algo.tis_cap=2"], "no effect"),
    ([RC + "seq_is_cap=3"], "no effect"),
    ([RC + "modes=[icepop]", RC + "icepop_low=3"], "low < high"),
    ([RC + "modes=[token_reject]", RC + "reject_kl_type=k4"], "reject_kl_type"),
    ([RC + "modes=[seq_reject]", RC + "seq_reject_threshold=0"], "> 0"),
])
def test_config_errors(over, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, over)


# ------------------------------------------------------------------------ through a real (tiny) megatron actor

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A world-size-1 megatron actor with optimizer (actor.lr = 0: every train_step sees the same weights)."""
    import os

    from test_trainer_fixtures import build_assets, tiny_overrides

    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel
    from rfpo_megatron.rollout.procs import free_port

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rc_actor")
    assets = build_assets(str(root / "assets"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    init_parallel(1, 1, seed=5)
    base = tiny_overrides(assets, str(root / "out"), **{"actor.lr": 0.0})
    actor = T.build_actor(load_config(None, base))
    yield actor, (lambda *o: load_config(None, base + list(o)))
    destroy_parallel()


def test_real_train_step_masked_tokens_and_weights_act_as_their_formula(real):
    """update_policy -> Actor.train_step: the icepop + seq_is step trains exactly like a step with those tokens
    removed from the loss mask by hand and the float64 sequence weights given by hand, and unlike no correction."""
    from dataclasses import replace

    actor, make_cfg = real
    batch = T.build_batch(_groups())
    old, _ = T.logprob_pass(actor, batch)
    lr = [[0.1, -0.8, 0.9], [0.02, -0.04], [0.3, 0.3, 0.2, 0.4]]  # rollout = old − lr (fixed row: anything)
    roll = [[float(o) - x for o, x in zip(old[i].double().tolist(), r)] for i, r in enumerate(lr)] + [[-3.0] * 3]
    batch = replace(batch, rollout_logp=roll)
    gen = torch.Generator().manual_seed(0)
    adv = T.Advantages(torch.randn(batch.response_mask.shape, generator=gen) * batch.response_mask,
                       batch.response_mask.clone())

    def loss(cfg, step):
        rt = SimpleNamespace(cfg=cfg, actor=actor)
        return T.update_policy(rt, step)["train/loss"]

    cfg = make_cfg(RC + "modes=[icepop,seq_is]", "rfpo.enabled=false")
    corrected = T.make_step(cfg, batch, old, None, None, torch.zeros(batch.n), adv)
    plain_cfg = make_cfg("rfpo.enabled=false")
    plain = T.make_step(plain_cfg, batch, old, None, None, torch.zeros(batch.n), adv)
    mask = plain.loss_mask.clone()
    mask[0, 1] = mask[0, 2] = False  # ρ = e^-0.8 = 0.45 and e^0.9 = 2.46 are outside [0.5, 2]
    W = torch.ones(mask.shape)
    for i, s in enumerate([0.1, -0.02, 1.2]):  # Σ lr over the tokens icepop kept
        W[i, :len(lr[i])] = min(math.exp(s), 2.0)
    by_hand = replace(plain, loss_mask=mask, tis_weights=W)
    assert torch.equal(corrected.loss_mask, mask)
    assert torch.allclose(corrected.tis_weights, W, rtol=1e-6)
    got, want, none = loss(cfg, corrected), loss(plain_cfg, by_hand), loss(plain_cfg, plain)
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(got - none) > 1e-4


def test_environment_tokens_are_not_in_sequence_statistics():
    """A multi-turn sample's environment token (Sample.loss_mask 0) has no meaningful engine log-prob: it is
    neither corrected nor counted in the geometric mean of seq_mask_tis."""
    s = Sample(prompt_ids=[1, 2], response_ids=[5, 6, 7], rollout_logprobs=[-1.0, -9.0, -1.0], loss_mask=[1, 0, 1])
    batch = T.build_batch([RolloutGroup(prompt_ids=[1, 2], samples=[s])])
    old = torch.tensor([[-1.02, -1.0, -0.98]])  # env token: lr = 8 (ρ = 2981)
    cfg = load_config(None, [RC + "modes=[seq_mask_tis]", "algo.tis_cap=2.0"])
    adv = T.Advantages(torch.ones(1, 3), batch.response_mask.clone())
    step = T.make_step(cfg, batch, old, None, None, torch.zeros(1), adv)
    assert step.loss_mask[0].tolist() == [True, False, True]  # geometric mean over tokens 0, 2 = 1: kept
    assert step.tis_weights[0].tolist() == pytest.approx([math.exp(-0.02), 1.0, math.exp(0.02)], rel=1e-5)
    assert step.correction_metrics["train/rollout_logprob_gap_max"] == pytest.approx(0.02, rel=1e-4)
