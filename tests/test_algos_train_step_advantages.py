"""Every advantage-/reward-side knob of algo.* / rfpo.* acts in training: end to end through `Actor.train_step` (TP = 1).

Method (as tests/test_algos_train_step_knobs.py). Each test builds a step the way the trainer does: groups of
`Sample`s with rewards (and fixes) -> the trainer's own stages (`train.generation.score_samples` / `fix_stage` /
`dynamic_sampling` where the knob lives there) -> `build_batch` -> `logprob_pass` -> `compute_roff` ->
`step_advantages` -> `make_step` -> `update_policy` -> `Actor.train_step` (ppo, token-mean, rfpo.loss_form=weighted,
the defaults). The actor's gradient is G = Σ_t c_t ∇θ logp_t; at the first step ρ = 1, so with the weighted form
c_t = −w_i·A_{i,t}/N_tok (ref.ref_ppo_tok's gradient), w_i = R_off of row i (1 unless fixed), N_tok = tokens
in the loss. A_{i,t}, w_i and the kept rows are computed INDEPENDENTLY in float64 from the formulas of
docs/algorithms.md (tests/_algos_ref.py references; rows, groups and fixes written down by the test, never read
back from the code under test), and Σ_t c_t ∇θ logp_t is obtained from a second train step with
`reinforce_loss`. Each knob's gradient must equal it (relative error < 2e-5, fp32) and differ from the
gradient of the knob's other value. The optimizer step is intercepted (gradients read, weights unchanged),
so one actor serves every case. A fake tokenizer (char i <-> id i), verifier (first token 42 -> 1.0,
41 -> 0.5, 40 -> 0.25, else 0) and engine (scripted fix outputs) stand in for the rollout side.

Knobs covered here: algo.adv_estimator (grpo, dr_grpo, rloo, reinforce, reinforce_pp, reinforce_pp_baseline,
remax, gae with given values, reinforce_rej, raft), algo.norm_adv_by_std, algo.gamma (reinforce_pp, gae),
algo.lam, algo.use_kl_in_reward / kl_in_reward_coef / kl_in_reward_type (sequence reward for grpo, per token
for reinforce_pp), algo.kl_target / kl_horizon (adaptive β over two steps), algo.overlong_buffer_len /
overlong_penalty_factor / max_response_len (DAPO shaping in score_samples), algo.dynamic_sampling /
max_gen_batches, rfpo.enabled, rfpo.gamma, rfpo.roff_mode, rfpo.roff_clip, rfpo.wrong_advantage,
rfpo.fix.placement, rfpo.fix.success_threshold (placement and the VAPO positive flag), rfpo.fix.max_per_group,
rfpo.fix.threshold (target selection and the wrong rows of wrong_advantage=zero).

Data-side knobs, tested in tests/test_fix_stage.py (they only change what is generated, not how a given step
trains): rfpo.fix.variant (test_mixed_variants_cycle_and_error_info_prompt, test_all_wrong_replace_...),
rfpo.fix.templates (test_templates_from_yaml_and_config_errors, test_score_callback_engine_objects_and_full_config),
rfpo.fix.temperature and rfpo.fix.max_new_tokens (test_score_callback_engine_objects_and_full_config),
rfpo.fix.attempts (test_all_wrong_replace_records_plain_prompt_and_original, test_generate_output_count_checked),
rfpo.fix.trigger (test_any_wrong_append_and_max_per_group).
"""
from __future__ import annotations

import copy
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from grad_actor import HF, grad_recording_actor  # noqa: E402
import _algos_ref as ref  # noqa: E402

REWARD_OF_FIRST = {42: 1.0, 41: 0.5, 40: 0.25}  # the fake verifier: first response token -> reward
EPS = 0.2  # resolved default clip range of ppo (the loss is inside it at ρ = 1)


# --------------------------------------------------------------------------------------- fixture, fakes
@pytest.fixture(scope="module")
def actor():
    yield from grad_recording_actor(micro_batch_size=4)


class Tok:
    """Char-level fake tokenizer: id i <-> chr(48 + i)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [(ord(c) - 48) % HF["vocab_size"] for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(48 + int(i)) for i in ids)


def verifier(text, answer, record):
    return REWARD_OF_FIRST.get(ord(text[0]) - 48, 0.0) if text else 0.0


class Engine:
    """Scripted engine: each generated response pops the next id list of `script`."""

    def __init__(self, script):
        self.script = [list(s) for s in script]

    def generate(self, prompts, params):
        from rfpo_megatron.rollout.base import GenerateResult

        return [[GenerateResult(output_ids=self.script.pop(0), logprobs=None, finish_reason="stop")
                 for _ in range(params.n)] for _ in prompts]


class RefActor:
    """A reference policy for the KL in reward: the actor's log-probs + a fixed, known perturbation."""

    def __init__(self, actor):
        self.actor = actor

    def compute_logprobs(self, batch):
        lp, ent = self.actor.compute_logprobs(batch)
        return [x + _ref_shift(i, len(x)).float() for i, x in enumerate(lp)], ent


def _ref_shift(i, n):
    return 0.3 * torch.cos(1.7 * torch.arange(n, dtype=torch.float64) + i)


@dataclass
class Row:
    """One sequence as the test writes it down (the independent side)."""

    p: list
    o: list
    r: float
    g: int
    fixed_from: list = None

    @property
    def is_fixed(self):
        return self.fixed_from is not None


def _ids(rng, n, reward):
    first = {v: k for k, v in REWARD_OF_FIRST.items()}.get(reward)
    ids = [rng.randrange(0, 40) for _ in range(n)]
    if first is not None:
        ids[0] = first
    return ids


def _groups(spec, seed=0):
    """spec: per group a list of (response length, reward). -> RolloutGroups (rewards = the fake verifier's)."""
    from rfpo_megatron.data.types import RolloutGroup, Sample

    rng = random.Random(seed)
    out = []
    for gi, samples in enumerate(spec):
        p = [rng.randrange(0, 61) for _ in range(rng.randint(2, 4))]
        g = RolloutGroup(prompt_ids=p, record={"prompt": "q%d" % gi, "answer": "7"})
        for L, r in samples:
            o = _ids(rng, L, r)
            text = Tok().decode(o)
            assert verifier(text, "", {}) == r
            g.samples.append(Sample(prompt_ids=list(p), response_ids=o, rollout_logprobs=[], reward=r,
                                    response_text=text, record=g.record))
        out.append(g)
    return out


def _rows(groups):
    """Rows of plain (unfixed) groups, in order."""
    return [Row(list(g.prompt_ids), list(s.response_ids), float(s.reward), gi)
            for gi, g in enumerate(groups) for s in g.samples]


SPEC = [[(5, 1.0), (3, 0.0), (7, 0.0), (4, 1.0)],
        [(6, 0.0), (2, 0.0), (5, 0.0)],                 # all equal
        [(4, 1.0), (8, 0.5), (3, 0.0), (6, 0.5)]]


# ---------------------------------------------------------------------------------- the trainer's step
def _cfg(algo=None, rfpo=None, fix=None, **sections):
    from rfpo_megatron.config import Config, validate

    cfg = Config()
    for k, v in (algo or {}).items():
        setattr(cfg.algo, k, v)
    for k, v in (rfpo or {}).items():
        setattr(cfg.rfpo, k, v)
    for k, v in (fix or {}).items():
        setattr(cfg.rfpo.fix, k, v)
    for sec, kv in sections.items():
        for k, v in kv.items():
            setattr(getattr(cfg, sec), k, v)
    cfg.data.chat_template = False
    return validate(cfg)


def _runtime(actor, cfg, script=()):
    from rfpo_megatron.train.runtime import Runtime

    return Runtime(cfg=cfg, actor=actor, ref_actor=RefActor(actor) if cfg.algo.use_kl_in_reward else None,
                   engine=Engine(script), tokenizer=Tok(), verifier=verifier, eos_ids=[])


def _train_step(rt, groups, values_fn=None):
    """The trainer's step (trainer.py: build_batch ... update_policy) -> flat reduced gradient."""
    from rfpo_megatron.train.batch import build_batch, compute_roff, logprob_pass, make_step, step_advantages, update_policy

    cfg = rt.cfg
    batch = build_batch(groups, rt.pad_id)
    old, orig = logprob_pass(rt.actor, batch)
    ref_lp = logprob_pass(rt.ref_actor, batch, originals=False)[0] if rt.ref_actor is not None else None
    values = None
    if values_fn is not None:
        T = batch.response_mask.shape[1]
        values = torch.stack([torch.nn.functional.pad(values_fn(i, len(o)).float(), (0, T - len(o)))
                              for i, o in enumerate(batch.response_ids)])
    log_roff = compute_roff(cfg, batch, old, orig)
    adv = step_advantages(rt, batch, old, ref_lp, values, {})
    step = make_step(cfg, batch, old, ref_lp, values, log_roff, adv)
    rt.actor._grads.clear()
    update_policy(rt, step)
    assert len(rt.actor._grads) == 1
    return torch.cat([g.reshape(-1) for g in rt.actor._grads[-1]])


def _step(actor, groups, values_fn=None, **cfg_kw):
    return _train_step(_runtime(actor, _cfg(**cfg_kw)), copy.deepcopy(groups), values_fn)


# ------------------------------------------------------------------------------- the independent side
def _lp(actor, pairs):
    """float64 per-token log-probs of (prompt, response) pairs under the actor's (unchanged) weights."""
    from rfpo_megatron.actor.batch import ActorBatch

    lp, _ = actor.compute_logprobs(ActorBatch.from_prompt_response([p for p, _ in pairs], [o for _, o in pairs]))
    return [x.double().tolist() for x in lp]


def _grad_of_coefs(actor, rows, coefs):
    """Σ_t c_t ∇θ logp_t through Actor.train_step (reinforce_loss, token-mean: dL/dlogp_t = −A_t / N)."""
    from rfpo_megatron.actor.batch import ActorBatch
    from rfpo_megatron.config import AlgoConfig

    n = sum(len(c) for c in coefs)
    b = ActorBatch.from_prompt_response([r.p for r in rows], [r.o for r in rows],
                                        advantages=[(-torch.as_tensor(c, dtype=torch.float64) * n).float() for c in coefs],
                                        old_logp=[torch.zeros(len(r.o)) for r in rows])
    b.validate()
    actor._grads.clear()
    actor.train_step(b, AlgoConfig(policy_loss="reinforce_loss", loss_agg_mode="token-mean"), None)
    return torch.cat([g.reshape(-1) for g in actor._grads[-1]])


def _coefs(actor, rows, adv, w=None, keep=None):
    """c_t = w_i·dL_ppo/dlogp_t(ρ = 1, A_{i,t}) / N_tok on kept rows (weighted form), 0 on dropped rows."""
    n = len(rows)
    w = w or [1.0] * n
    keep = keep or [True] * n
    lp = _lp(actor, [(r.p, r.o) for r in rows])
    n_tok = sum(len(r.o) for r, k in zip(rows, keep) if k)
    out = []
    for i, r in enumerate(rows):
        a = adv[i] if isinstance(adv[i], list) else [float(adv[i])] * len(r.o)
        out.append([w[i] * ref.ref_ppo_tok(lp[i][t], lp[i][t], a[t], 1.0, "corrected", el=EPS, eh=EPS)[1] / n_tok
                    if keep[i] else 0.0 for t in range(len(r.o))])
    return out


def _want(actor, rows, adv, w=None, keep=None, extra=None):
    c = _coefs(actor, rows, adv, w, keep)
    if extra is not None:
        c = [[x + y for x, y in zip(ci, ei)] for ci, ei in zip(c, extra)]
    return _grad_of_coefs(actor, rows, c)


def _close(g, want, tol=2e-5):
    err = float((g - want).norm() / want.norm().clamp(min=1e-30))
    assert err < tol, f"relative gradient error {err:.3g}"


def _differ(g, other, rel=1e-3):
    assert float((g - other).norm()) > rel * float(other.norm()), "the knob did not change the gradient"


def _mask(rows):
    T = max(len(r.o) for r in rows)
    return [[1 if t < len(r.o) else 0 for t in range(T)] for r in rows]


def _padded(rows, vals):
    T = max(len(r.o) for r in rows)
    return [list(v) + [0.0] * (T - len(v)) for v in vals]


def _group_mean(rows):
    by: dict = {}
    for r in rows:
        by.setdefault(r.g, []).append(r.r)
    return [sum(by[r.g]) / len(by[r.g]) for r in rows]


def _roff(actor, rows, gamma=1.0, mode="seq_mean", clip=2.0):
    """w_i = exp(clamp(γ·(S(o) − S(o_f)), ±clip)) on fixed rows, S = mean or sum of the actor's log-probs."""
    out = []
    for r in rows:
        if not r.is_fixed:
            out.append(1.0)
            continue
        lo, lf = _lp(actor, [(r.p, r.fixed_from), (r.p, r.o)])
        S = (lambda x: sum(x) / len(x)) if mode == "seq_mean" else sum
        out.append(math.exp(min(max(gamma * (S(lo) - S(lf)), -clip), clip)))
    return out


def _trim(rows, vals):
    return [v[:len(r.o)] for r, v in zip(rows, vals)]


# ------------------------------------------------------------------------------------ advantage knobs
def _expected_adv(est, rows, groups, lp=None, gamma=1.0, lam=1.0, values_fn=None):
    """(per-row advantages, keep) in float64 from docs/algorithms.md's estimator table."""
    r = [x.r for x in rows]
    gid = torch.tensor([x.g for x in rows])
    mean = _group_mean(rows)
    keep = None
    if est == "grpo":
        adv = ref.ref_grpo(r, gid, norm=True)
    elif est == "dr_grpo":
        adv = [ri - m for ri, m in zip(r, mean)]
    elif est == "rloo":
        adv = ref.ref_rloo(r, gid)
    elif est == "reinforce":
        adv = list(r)
    elif est in ("reinforce_pp", "reinforce_pp_baseline"):
        scores = r if est == "reinforce_pp" else [ri - m for ri, m in zip(r, mean)]
        zeros = _padded(rows, [[0.0] * len(x.o) for x in rows])
        adv = _trim(rows, ref.ref_reinforce_pp(scores, _mask(rows), zeros, zeros, 0.0, "k1", gamma)[0])
    elif est == "remax":
        adv = [ri - groups[x.g].baseline_reward for ri, x in zip(r, rows)]
    elif est == "gae":
        vals = _padded(rows, [values_fn(i, len(x.o)).tolist() for i, x in enumerate(rows)])
        adv = _trim(rows, ref.ref_whiten(ref.ref_gae(r, _mask(rows), vals, gamma, lam), _mask(rows)))
    elif est == "reinforce_rej":
        const = {x.g: len({y.r for y in rows if y.g == x.g}) == 1 for x in rows}
        keep = [not const[x.g] for x in rows]
        adv = [2 * ri - 1 if k else 0.0 for ri, k in zip(r, keep)]
    elif est == "raft":
        gmax = {x.g: max(y.r for y in rows if y.g == x.g) for x in rows}
        keep = [x.r > 0 and x.r == gmax[x.g] for x in rows]
        adv = [1.0 if k else 0.0 for k in keep]
    else:
        raise AssertionError(est)
    return adv, keep


def _values(i, n):
    return 0.4 * torch.sin(torch.arange(n, dtype=torch.float64) * 0.7 + i) + 0.1 * i


ESTIMATORS = ["grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "reinforce_pp_baseline", "remax", "gae",
              "reinforce_rej", "raft"]


@pytest.mark.parametrize("est", ESTIMATORS)
def test_adv_estimator(actor, est):
    """algo.adv_estimator: each estimator's advantages reach the gradient as docs/algorithms.md's formula says
    (reinforce_rej / raft: the dropped rows leave the loss and its token count)."""
    groups = _groups(SPEC)
    if est == "remax":
        for g, b in zip(groups, (0.0, 1.0, 0.5)):
            g.baseline_reward = b
    rows = _rows(groups)
    vf = _values if est == "gae" else None
    g = _step(actor, groups, vf, algo=dict(adv_estimator=est))
    adv, keep = _expected_adv(est, rows, groups, values_fn=vf)
    want = _want(actor, rows, adv, keep=keep)
    _close(g, want)
    if est != "grpo":
        _differ(g, _step(actor, groups, algo=dict(adv_estimator="grpo")))


def test_norm_adv_by_std(actor):
    groups = _groups(SPEC)
    rows = _rows(groups)
    g = _step(actor, groups, algo=dict(norm_adv_by_std=False))
    _close(g, _want(actor, rows, ref.ref_grpo([r.r for r in rows], torch.tensor([r.g for r in rows]), norm=False)))
    _differ(g, _step(actor, groups))


@pytest.mark.parametrize("est", ["reinforce_pp", "gae"])
def test_gamma(actor, est):
    """algo.gamma: the discount of REINFORCE++ returns and of GAE."""
    groups = _groups(SPEC)
    rows = _rows(groups)
    vf = _values if est == "gae" else None
    g = _step(actor, groups, vf, algo=dict(adv_estimator=est, gamma=0.8))
    adv, _ = _expected_adv(est, rows, groups, gamma=0.8, values_fn=vf)
    _close(g, _want(actor, rows, adv))
    _differ(g, _step(actor, groups, vf, algo=dict(adv_estimator=est)))


def test_lam_gae(actor):
    """algo.lam with given critic values (A_t = δ_t + γλA_{t+1}, whitened over the batch)."""
    groups = _groups(SPEC)
    rows = _rows(groups)
    g = _step(actor, groups, _values, algo=dict(adv_estimator="gae", lam=0.7, gamma=0.9))
    adv, _ = _expected_adv("gae", rows, groups, gamma=0.9, lam=0.7, values_fn=_values)
    _close(g, _want(actor, rows, adv))
    _differ(g, _step(actor, groups, _values, algo=dict(adv_estimator="gae", gamma=0.9)))


# ----------------------------------------------------------------------------------------- KL in reward
def _kl_tokens(actor, rows, kind):
    """k(old, ref) per valid token, old = the actor's log-probs, ref = old + the RefActor's shift."""
    lp = _lp(actor, [(r.p, r.o) for r in rows])
    return [[ref.ref_kl(l, l + float(s), kind) for l, s in zip(lp[i], _ref_shift(i, len(lp[i])).tolist())]
            for i in range(len(rows))], lp


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_in_reward_grpo_sequence_reward(actor, kind):
    """algo.use_kl_in_reward / kl_in_reward_coef / kl_in_reward_type, a sequence-level estimator:
    GRPO on r_i − β·Σ_t k_t."""
    groups = _groups(SPEC)
    rows = _rows(groups)
    beta = 0.4
    g = _step(actor, groups, algo=dict(use_kl_in_reward=True, kl_in_reward_coef=beta, kl_in_reward_type=kind))
    kl, _ = _kl_tokens(actor, rows, kind)
    r = [x.r - beta * sum(k) for x, k in zip(rows, kl)]
    _close(g, _want(actor, rows, ref.ref_grpo(r, torch.tensor([x.g for x in rows]))))
    _differ(g, _step(actor, groups))
    _differ(g, _step(actor, groups, algo=dict(use_kl_in_reward=True, kl_in_reward_coef=0.1, kl_in_reward_type=kind)))
    if kind != "k1":
        _differ(g, _step(actor, groups, algo=dict(use_kl_in_reward=True, kl_in_reward_coef=beta)))


def test_kl_in_reward_reinforce_pp_per_token(actor):
    """KL in reward for a token-level estimator: token reward −β·k_t, r_i on the last token (REINFORCE++)."""
    groups = _groups(SPEC)
    rows = _rows(groups)
    beta = 0.3
    g = _step(actor, groups, algo=dict(adv_estimator="reinforce_pp", use_kl_in_reward=True, kl_in_reward_coef=beta,
                                       kl_in_reward_type="k2", gamma=0.9))
    _, lp = _kl_tokens(actor, rows, "k2")
    refl = [[l + float(s) for l, s in zip(lp[i], _ref_shift(i, len(lp[i])).tolist())] for i in range(len(rows))]
    adv = _trim(rows, ref.ref_reinforce_pp([x.r for x in rows], _mask(rows), _padded(rows, lp), _padded(rows, refl),
                                           beta, "k2", 0.9)[0])
    _close(g, _want(actor, rows, adv))
    _differ(g, _step(actor, groups, algo=dict(adv_estimator="reinforce_pp", gamma=0.9)))


@pytest.mark.parametrize("horizon", [20, 200])
def test_kl_target_and_horizon_adapt_beta_between_steps(actor, horizon):
    """algo.kl_target / kl_horizon: step 1 uses β0; step 2 uses β1 = β0·(1 + clip(KL/target − 1, ±0.2)·n/horizon),
    KL = mean over sequences of each sequence's token-mean k1 (docs/algorithms.md, KL in reward)."""
    groups = _groups(SPEC)
    rows = _rows(groups)
    beta0, target = 0.4, 1e-3
    algo = dict(use_kl_in_reward=True, kl_in_reward_coef=beta0, kl_target=target, kl_horizon=horizon)
    rt = _runtime(actor, _cfg(algo=algo))
    g1 = _train_step(rt, copy.deepcopy(groups))
    g2 = _train_step(rt, copy.deepcopy(groups))
    kl, _ = _kl_tokens(actor, rows, "k1")
    cur = sum(sum(k) / len(k) for k in kl) / len(kl)
    beta1 = beta0 * (1 + min(max(cur / target - 1, -0.2), 0.2) * len(rows) / horizon)
    assert abs(beta1 / beta0 - 1) > 1e-3
    gid = torch.tensor([x.g for x in rows])
    for g, beta in ((g1, beta0), (g2, beta1)):
        r = [x.r - beta * sum(k) for x, k in zip(rows, kl)]
        _close(g, _want(actor, rows, ref.ref_grpo(r, gid)))
    _differ(g2, g1, rel=1e-4)
    assert rt.counters["kl_in_reward_coef"] == pytest.approx(
        beta1 * (1 + min(max(cur / target - 1, -0.2), 0.2) * len(rows) / horizon), rel=1e-9)


# --------------------------------------------------------------------------------------- DAPO shaping
@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_overlong_shaping(actor, factor):
    """algo.overlong_buffer_len / overlong_penalty_factor / max_response_len (score_samples, the trainer's
    scorer): r += factor·pen(|o|), pen = 0 up to L_max − L_cache, linear to −1 at L_max, −1 beyond."""
    from rfpo_megatron.train.generation import score_samples

    L_max, L_cache = 7, 3
    groups = _groups(SPEC)
    rows = _rows(groups)
    cfg = _cfg(algo=dict(overlong_buffer_len=L_cache, overlong_penalty_factor=factor, max_response_len=L_max))
    rt = _runtime(actor, cfg)
    correct = score_samples(rt, [s for g in groups for s in g.samples])
    assert correct == [r.r for r in rows]  # the verifier's score before shaping
    g = _train_step(rt, groups)

    def pen(n):
        return -factor * min(max((n - (L_max - L_cache)) / L_cache, 0.0), 1.0)

    r = [x.r + pen(len(x.o)) for x in rows]
    assert any(-1 < pen(len(x.o)) < 0 for x in rows) and any(pen(len(x.o)) == -factor for x in rows)
    _close(g, _want(actor, rows, ref.ref_grpo(r, torch.tensor([x.g for x in rows]))))
    _differ(g, _step(actor, _groups(SPEC)))
    if factor == 1.0:  # max_response_len moves the window
        rt2 = _runtime(actor, _cfg(algo=dict(overlong_buffer_len=L_cache, max_response_len=L_max + 2)))
        gs = _groups(SPEC)
        score_samples(rt2, [s for gg in gs for s in gg.samples])
        _differ(g, _train_step(rt2, gs))


# ------------------------------------------------------------------------------------ dynamic sampling
@pytest.mark.parametrize("max_gen_batches", [1, 2])
def test_dynamic_sampling_drops_equal_groups_and_refills(actor, monkeypatch, max_gen_batches):
    """algo.dynamic_sampling / max_gen_batches (train.generation.dynamic_sampling): all-equal groups are
    dropped (they contribute nothing: the gradient is the kept groups' own, N_tok of the kept rows), and
    refill rounds add groups up to max_gen_batches rounds."""
    from rfpo_megatron.train import generation

    groups = _groups(SPEC)
    refill = [_groups([[(3, 1.0), (3, 1.0)], [(4, 0.0), (6, 1.0), (2, 0.5)]], seed=7)]
    monkeypatch.setattr(generation, "rollout", lambda rt, records, seed: refill.pop(0))
    monkeypatch.setattr(generation, "fix_stage", lambda rt, gs, seed: (gs, {}))
    cfg = _cfg(algo=dict(dynamic_sampling=True, max_gen_batches=max_gen_batches), data=dict(prompts_per_step=3))
    rt = _runtime(actor, cfg)
    rt.prompts, rt.sampler = [{"prompt": "x"}], SimpleNamespace(next_indices=lambda: [0])
    m: dict = {}
    kept = generation.dynamic_sampling(rt, copy.deepcopy(groups), 0, m)
    assert m["rollout/dynamic_sampling_rounds"] == max_gen_batches
    g = _train_step(rt, kept)
    expect_groups = [groups[0], groups[2]] + ([] if max_gen_batches == 1 else [_groups(
        [[(3, 1.0), (3, 1.0)], [(4, 0.0), (6, 1.0), (2, 0.5)]], seed=7)[1]])
    rows = _rows(expect_groups)
    gid = torch.tensor([x.g for x in rows])
    _close(g, _want(actor, rows, ref.ref_grpo([x.r for x in rows], gid)))
    g_off = _step(actor, groups)
    if max_gen_batches == 1:  # without dynamic sampling the equal group adds only tokens to N_tok
        n_all = sum(len(x.o) for x in _rows(groups))
        n_kept = sum(len(x.o) for x in rows)
        _close(g_off, g * (n_kept / n_all))
    _differ(g, g_off)


# ---------------------------------------------------------------------------------------- RFPO knobs
def _fixed_groups():
    """Group 0 all wrong with fixes (o_f replaces o at rows 0 and 2), group 1 mixed, group 2 all wrong unfixed."""
    from rfpo_megatron.data.types import Sample

    groups = _groups([[(5, 0.0), (3, 0.0), (7, 0.0), (4, 0.0)], [(4, 1.0), (6, 0.0), (3, 0.0)],
                      [(3, 0.0), (5, 0.0)]], seed=3)
    rng = random.Random(11)
    g = groups[0]
    for si, L in ((0, 3), (2, 9)):
        o = g.samples[si].response_ids
        f = _ids(rng, L, 1.0)
        g.samples[si] = Sample(prompt_ids=list(g.prompt_ids), response_ids=f, reward=1.0, is_fixed=True,
                               fixed_from=list(o), use_tis=False, record=g.record, response_text=Tok().decode(f))
    rows = []
    for gi, gg in enumerate(groups):
        for s in gg.samples:
            rows.append(Row(list(gg.prompt_ids), list(s.response_ids), float(s.reward), gi,
                            list(s.fixed_from) if s.is_fixed else None))
    return groups, rows


def _grpo(rows):
    return ref.ref_grpo([x.r for x in rows], torch.tensor([x.g for x in rows]))


@pytest.mark.parametrize("kw", [dict(), dict(gamma=0.5), dict(roff_mode="seq_sum"), dict(roff_clip=0.05),
                                dict(roff_mode="seq_sum", roff_clip=5.0, gamma=0.3)])
def test_roff_gamma_mode_clip(actor, kw):
    """rfpo.gamma / roff_mode / roff_clip: a fix's gradient is w = exp(clamp(γ(S(o) − S(o_f)), ±clip)) times
    the base one (weighted form); unfixed rows weight 1."""
    groups, rows = _fixed_groups()
    g = _step(actor, groups, rfpo=kw)
    w = _roff(actor, rows, kw.get("gamma", 1.0), kw.get("roff_mode", "seq_mean"), kw.get("roff_clip", 2.0))
    assert sum(abs(math.log(x)) > 1e-3 for x in w) == 2
    _close(g, _want(actor, rows, _grpo(rows), w=w))
    if kw:
        _differ(g, _step(actor, groups))


def test_roff_clip_is_active_in_these_cases(actor):
    """The data above exercise the clamp: seq_mean |ΔS| lies in (0.05, 2) (clip 0.05 clamps, 2 does not);
    seq_sum |ΔS| exceeds 2 for a fix (the default clip clamps it)."""
    _, rows = _fixed_groups()
    raw = [abs(math.log(x)) for x in _roff(actor, rows, clip=1e9) if x != 1.0]
    assert all(0.05 < x < 2.0 for x in raw), raw
    raw_sum = [abs(math.log(x)) for x in _roff(actor, rows, mode="seq_sum", clip=1e9) if x != 1.0]
    assert any(x > 2.0 for x in raw_sum), raw_sum


def test_rfpo_enabled(actor):
    """rfpo.enabled=false: no R_off (w = 1) and no rfpo loss options; the fixes train as ordinary samples."""
    groups, rows = _fixed_groups()
    g = _step(actor, groups, rfpo=dict(enabled=False))
    _close(g, _want(actor, rows, _grpo(rows)))
    _differ(g, _step(actor, groups))


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_wrong_advantage_zero(actor, threshold):
    """rfpo.wrong_advantage=zero: the wrong samples (reward ≤ rfpo.fix.threshold, not fixed) of a group holding
    a fix get advantage 0 but stay in N_tok; the group statistics include them."""
    from rfpo_megatron.data.types import Sample

    groups, rows = _fixed_groups()
    # a reward-0.25 wrong sample in the fixed group: wrong only when threshold >= 0.25
    s = groups[0].samples[3]
    o = [40] + s.response_ids[1:]
    groups[0].samples[3] = Sample(prompt_ids=s.prompt_ids, response_ids=o, reward=0.25, record=s.record,
                                  response_text=Tok().decode(o))
    rows[3] = Row(rows[3].p, o, 0.25, 0)
    g = _step(actor, groups, rfpo=dict(wrong_advantage="zero"), fix=dict(threshold=threshold))
    adv = _grpo(rows)
    has_fix = {x.g for x in rows if x.is_fixed}
    adv = [0.0 if (x.r <= threshold and not x.is_fixed and x.g in has_fix) else a for x, a in zip(rows, adv)]
    assert (adv[3] == 0.0) == (threshold >= 0.25)
    _close(g, _want(actor, rows, adv, w=_roff(actor, rows)))
    _differ(g, _step(actor, groups, fix=dict(threshold=threshold)))


# ------------------------------------------------------------------- rfpo.fix.* through the fix stage
ORIG = [[(5, 0.0), (3, 0.0), (7, 0.0), (4, 0.0)], [(4, 1.0), (6, 0.0), (3, 0.0)]]
FIX_IDS = [[42, 7, 3], [42, 11, 5, 9, 2, 8], [42, 1, 1, 30]]  # fix outputs in generation order (all correct)


def _fix_step(actor, script, fix=None, algo=None, orig=ORIG):
    """The trainer's fix_stage (engine -> score_samples -> run_fix_stage placement) then the step."""
    from rfpo_megatron.train.generation import fix_stage

    cfg = _cfg(fix=fix, algo=algo)
    rt = _runtime(actor, cfg, script)
    groups, _ = fix_stage(rt, _groups(orig, seed=5), seed=0)
    return _train_step(rt, groups)


def _fix_rows(placement, n_fix, fix_ids=FIX_IDS, orig=ORIG, fix_rewards=None):
    """Expected rows after the fix stage, written down by hand: group 0 (all wrong) fixed at its first n_fix
    samples (replace: in place; append: at the end), group 1 (mixed) untouched (trigger all_wrong)."""
    base = _rows(_groups(orig, seed=5))
    g0 = [r for r in base if r.g == 0]
    fixes = [Row(g0[k].p, list(fix_ids[k]), (fix_rewards or [1.0] * n_fix)[k], 0, g0[k].o) for k in range(n_fix)]
    g0_new = (fixes + g0[n_fix:]) if placement == "replace" else (g0 + fixes)
    return g0_new + [r for r in base if r.g == 1]


@pytest.mark.parametrize("placement", ["replace", "append"])
@pytest.mark.parametrize("max_per_group", [1, 2])
def test_fix_placement_and_max_per_group(actor, placement, max_per_group):
    """rfpo.fix.placement / max_per_group: which rows (and with which R_off) reach the step."""
    g = _fix_step(actor, FIX_IDS, fix=dict(placement=placement, max_per_group=max_per_group))
    rows = _fix_rows(placement, max_per_group)
    _close(g, _want(actor, rows, _grpo(rows), w=_roff(actor, rows)))
    other = dict(placement="append" if placement == "replace" else "replace", max_per_group=max_per_group)
    _differ(g, _fix_step(actor, FIX_IDS, fix=other))
    _differ(g, _fix_step(actor, FIX_IDS, fix=dict(placement=placement, max_per_group=3 - max_per_group)))


@pytest.mark.parametrize("thr", [1.0, 0.5])
def test_fix_success_threshold(actor, thr):
    """rfpo.fix.success_threshold: a fix of correctness 0.5 is placed only when 0.5 ≥ threshold; and the VAPO
    positive rows (algo.pos_nll_coef) are those with reward ≥ threshold: + μ·Σ_{pos} −logp / N_pos."""
    mu = 0.5
    script = [[41, 4, 4], [41, 9, 2, 7]]  # two fixes, each verifier score 0.5
    g = _fix_step(actor, script, fix=dict(success_threshold=thr, max_per_group=2), algo=dict(pos_nll_coef=mu))
    rows = _fix_rows("replace", 2, fix_ids=script, fix_rewards=[0.5, 0.5]) if thr <= 0.5 else _rows(_groups(ORIG, seed=5))
    pos = [x.r >= thr for x in rows]
    n_pos = sum(len(x.o) for x, p in zip(rows, pos) if p)
    assert n_pos > 0
    extra = [[-mu / n_pos if p else 0.0] * len(x.o) for x, p in zip(rows, pos)]
    _close(g, _want(actor, rows, _grpo(rows), w=_roff(actor, rows), extra=extra))
    _differ(g, _fix_step(actor, script, fix=dict(success_threshold=1.5 - thr, max_per_group=2),
                         algo=dict(pos_nll_coef=mu)))


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_fix_threshold_selects_the_groups_to_fix(actor, threshold):
    """rfpo.fix.threshold: a group of rewards 0.25 is "all wrong" (fixed) only when 0.25 ≤ threshold."""
    orig = [[(5, 0.25), (3, 0.25), (7, 0.25)], [(4, 1.0), (6, 0.0), (3, 0.0)]]
    g = _fix_step(actor, FIX_IDS, fix=dict(threshold=threshold, max_per_group=1), orig=orig)
    rows = (_fix_rows("replace", 1, orig=orig) if threshold >= 0.25 else _rows(_groups(orig, seed=5)))
    _close(g, _want(actor, rows, _grpo(rows), w=_roff(actor, rows)))
    _differ(g, _fix_step(actor, FIX_IDS, fix=dict(threshold=0.3 - threshold, max_per_group=1), orig=orig))
