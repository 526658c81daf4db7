"""Every loss knob of algo.* / rfpo.* acts in training: end to end through `Actor.train_step` (TP = 1).

Method. The actor's gradient is G = Σ_t c_t ∇θ logp_t with c_t = ∂(total loss)/∂logp_t (every term of the
objective except the entropy bonus is a function of the sampled tokens' log-probs). For each knob the test
computes c_t INDEPENDENTLY in float64 from the formula (docs/algorithms.md; per-token references in
tests/_algos_ref.py) at the actor's current log-probs, and obtains the Jacobian product Σ_t c_t ∇θ logp_t from a
second train step with `reinforce_loss` (L = −A·logp, token-mean, A_t = −c_t·N). The knob's gradient must
equal it (relative error < 2e-5, fp32), and differ from the knob-off gradient. The optimizer step is
intercepted (gradients read, weights unchanged), so one actor serves every case.
"""
from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from grad_actor import HF, grad_recording_actor  # noqa: E402
import _algos_ref as ref  # noqa: E402

LENGTHS = [(3, 7), (2, 5), (4, 9), (1, 6), (3, 4), (2, 8)]  # (prompt, response)
GROUPS = [0, 0, 0, 1, 1, 1]
MAX_RESPONSE_LEN = 12
EL, EH, C = 0.2, 0.28, 3.0


@pytest.fixture(scope="module")
def actor():
    yield from grad_recording_actor(micro_batch_size=2)


def _batch(seed=1):
    from rfpo_megatron.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, HF["vocab_size"], (p + r,), generator=g) for p, r in LENGTHS]
    return ActorBatch(input_ids=ids, prompt_lens=[p for p, _ in LENGTHS])


def _filled(actor, seed=1, *, holes=True, roff=True):
    """A batch with old_logp = logp + noise (ratios on both sides of the clip range), per-sequence advantages,
    ref_logp, TIS weights, mask holes, R_off on rows 1 and 4, rows 0, 4 positive, rows 1, 4 fixed."""
    b = _batch(seed)
    lp, _ = actor.compute_logprobs(b)
    g = torch.Generator().manual_seed(100 + seed)
    b.old_logp = [x + 0.35 * torch.randn(x.shape, generator=g) for x in lp]
    advs = [1.3, -0.7, 0.4, -1.1, 0.9, -0.3]
    b.advantages = [torch.full(x.shape, a) for x, a in zip(lp, advs)]
    b.ref_logp = [x + 0.5 * torch.randn(x.shape, generator=g) for x in lp]
    b.response_mask = [torch.ones(x.numel(), dtype=torch.bool) for x in lp]
    if holes:
        b.response_mask[2][:2] = False
        b.response_mask[5][-1] = False
    if roff:
        b.log_roff = torch.tensor([0.0, 0.9, 0.0, 0.0, -1.2, 0.0])
    b.is_fixed = torch.tensor([False, True, False, False, True, False])
    b.is_positive = torch.tensor([True, False, False, False, True, False])
    b.validate()
    return b, [x.double() for x in lp]


def _algo(**kw):
    from rfpo_megatron.config import AlgoConfig

    base = dict(policy_loss="ppo", loss_agg_mode="token-mean", clip_ratio_low=EL, clip_ratio_high=EH,
                max_response_len=MAX_RESPONSE_LEN)
    base.update(kw)
    return AlgoConfig(**base)


def _rfpo(form):
    from rfpo_megatron.config import RFPOConfig

    return RFPOConfig(loss_form=form)


def _grad(actor, batch, algo, rfpo=None):
    actor._grads.clear()
    actor.train_step(batch, algo, rfpo)
    return torch.cat([g.reshape(-1) for g in actor._grads[-1]])


def _grad_of_coefs(actor, batch, coefs):
    """Σ_t c_t ∇θ logp_t through Actor.train_step (reinforce_loss, token-mean: dL/dlogp_t = −A_t / N)."""
    b = copy.copy(batch)
    n = sum(len(c) for c in coefs)
    b.advantages = [(-c * n).float() for c in coefs]
    b.response_mask, b.log_roff, b.tis_weights, b.is_positive = None, None, None, None
    b.validate()
    return _grad(actor, b, _algo(policy_loss="reinforce_loss", loss_agg_mode="token-mean"))


def _close(g, want, tol=2e-5):
    err = float((g - want).norm() / want.norm().clamp(min=1e-30))
    assert err < tol, f"relative gradient error {err:.3g}"


# --------------------------------------------------------------------------- float64 coefficient builders
def _rows(batch, lp):
    """Per row: (mask list, logp, old, A, ref, tis) as python floats."""
    out = []
    for i in range(len(lp)):
        m = batch.mask_of(i).tolist()
        tis = batch.tis_weights[i].tolist() if batch.tis_weights is not None else [1.0] * len(m)
        out.append((m, lp[i].tolist(), batch.old_logp[i].double().tolist(), batch.advantages[i].double().tolist(),
                    batch.ref_logp[i].double().tolist(), tis))
    return out


def _norms(batch, mode, max_len=None):
    """d agg / d L_t per row (a function of the row), for the aggregation modes with whole-step counts."""
    masks = [batch.mask_of(i) for i in range(len(batch))]
    n_tok = sum(int(m.sum()) for m in masks)
    n_seq = sum(1 for m in masks if bool(m.any()))
    if mode == "token-mean":
        return [1.0 / n_tok] * len(masks)
    if mode == "seq-mean-token-mean":
        return [1.0 / (max(1, int(m.sum())) * n_seq) for m in masks]
    if mode == "seq-mean-token-sum":
        return [1.0 / n_seq] * len(masks)
    return [1.0 / (n_seq * max_len)] * len(masks)


def _pg_coefs(batch, lp, tok_grad, mode="token-mean", max_len=None, R=None):
    """c_t of the aggregated policy loss; tok_grad(i, lp, old, A, R) -> d L_t / d logp_t."""
    norms = _norms(batch, mode, max_len)
    out = []
    for i, (m, l, o, a, _, tis) in enumerate(_rows(batch, lp)):
        r = 1.0 if R is None else R[i]
        out.append(torch.tensor([tok_grad(i, l[t], o[t], a[t], r) * tis[t] * norms[i] if m[t] else 0.0
                                 for t in range(len(m))], dtype=torch.float64))
    return out


def _ppo_grad(form="faithful", c=None, el=EL, eh=EH):
    def f(i, l, o, a, R):
        if form == "weighted":
            return R * ref.ref_ppo_tok(l, o, a, 1.0, "corrected", el=el, eh=eh, c=c)[1]
        return ref.ref_ppo_tok(l, o, a, R, form, el=el, eh=eh, c=c)[1]
    return f


def _R(batch):
    return [math.exp(float(x)) for x in batch.log_roff] if batch.log_roff is not None else None


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("form", ["faithful", "corrected", "weighted"])
@pytest.mark.parametrize("clip_c", [None, C])
def test_ppo_clip_ratios_dual_clip_and_loss_form(actor, fused, form, clip_c):
    """algo.clip_ratio_low/high/c and rfpo.loss_form (ppo; fused kernel twin and registry paths)."""
    actor.cfg.use_fused_kernels = fused
    try:
        b, lp = _filled(actor)
        g = _grad(actor, b, _algo(clip_ratio_c=clip_c), _rfpo(form))
        want = _grad_of_coefs(actor, b, _pg_coefs(b, lp, _ppo_grad(form, clip_c), R=_R(b)))
        _close(g, want)
    finally:
        actor.cfg.use_fused_kernels = True


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_loss_agg_mode(actor, mode):
    b, lp = _filled(actor)
    g = _grad(actor, b, _algo(loss_agg_mode=mode), _rfpo("weighted"))
    want = _grad_of_coefs(actor, b, _pg_coefs(b, lp, _ppo_grad("weighted"), mode, MAX_RESPONSE_LEN, R=_R(b)))
    _close(g, want)


def test_dr_grpo_lmax_is_the_config_constant_not_the_batch_longest(actor):
    """issue 14 fact 4: with loss_agg_max_len unset, L_max = algo.max_response_len (was max(batch lengths)=9);
    loss_agg_max_len, when set, wins."""
    b, lp = _filled(actor)
    for algo_kw, lmax in ((dict(), MAX_RESPONSE_LEN), (dict(loss_agg_max_len=20), 20)):
        g = _grad(actor, b, _algo(loss_agg_mode="seq-mean-token-sum-norm", **algo_kw), _rfpo("weighted"))
        want = _grad_of_coefs(actor, b, _pg_coefs(b, lp, _ppo_grad("weighted"), "seq-mean-token-sum-norm", lmax, R=_R(b)))
        _close(g, want)
    assert max(r for _, r in LENGTHS) != MAX_RESPONSE_LEN


def test_tis_weights_multiply_the_policy_gradient(actor):
    b, lp = _filled(actor)
    g0 = _grad(actor, b, _algo(), _rfpo("weighted"))
    gen = torch.Generator().manual_seed(5)
    b.tis_weights = [0.4 + torch.rand(x.shape, generator=gen) for x in lp]
    b.validate()
    g = _grad(actor, b, _algo(), _rfpo("weighted"))
    _close(g, _grad_of_coefs(actor, b, _pg_coefs(b, lp, _ppo_grad("weighted"), R=_R(b))))
    assert float((g - g0).norm()) > 1e-3 * float(g0.norm())


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3", "k1+", "k3+"])
def test_kl_loss_coef_and_type(actor, kl_type):
    """algo.use_kl_loss / kl_loss_coef / kl_loss_type: + coef·agg(k(logp, ref)); d/dlogp with Δ = ref − logp:
    k1 → 1, k2 → −Δ, k3 → 1 − e^Δ (inside the ±10 clamp), k1+/k3+ → −Δ (the k2 gradient)."""
    b, lp = _filled(actor)
    coef = 0.3
    g = _grad(actor, b, _algo(use_kl_loss=True, kl_loss_coef=coef, kl_loss_type=kl_type), _rfpo("weighted"))
    pg = _pg_coefs(b, lp, _ppo_grad("weighted"), R=_R(b))
    n = _norms(b, "token-mean")
    dk = {"k1": lambda d: 1.0, "k2": lambda d: -d, "k3": lambda d: 1.0 - math.exp(d),
          "k1+": lambda d: -d, "k3+": lambda d: -d}[kl_type]
    coefs = []
    for i, (m, l, _, _, rf, _) in enumerate(_rows(b, lp)):
        coefs.append(pg[i] + torch.tensor([coef * dk(rf[t] - l[t]) * n[i] if m[t] else 0.0 for t in range(len(m))],
                                          dtype=torch.float64))
    _close(g, _grad_of_coefs(actor, b, coefs))


def test_pos_nll_coef_vapo(actor):
    """algo.pos_nll_coef: + μ·Σ_{positive rows} −logp / N_pos (was ignored in training: issue 14 fact 1)."""
    b, lp = _filled(actor)
    mu = 0.5
    g0 = _grad(actor, b, _algo(), _rfpo("weighted"))
    g = _grad(actor, b, _algo(pos_nll_coef=mu), _rfpo("weighted"))
    pg = _pg_coefs(b, lp, _ppo_grad("weighted"), R=_R(b))
    pos = b.is_positive.tolist()
    n_pos = sum(int(b.mask_of(i).sum()) for i in range(len(b)) if pos[i])
    coefs = [pg[i] + (torch.tensor([-mu / n_pos if mm else 0.0 for mm in b.mask_of(i).tolist()], dtype=torch.float64)
                      if pos[i] else 0.0) for i in range(len(b))]
    _close(g, _grad_of_coefs(actor, b, coefs))
    assert float((g - g0).norm()) > 1e-2 * float(g0.norm())


def test_chord_mu(actor):
    """algo.chord_mu: (1−μ)·policy + μ·Σ_{fixed rows} −sg(p(1−p))·logp / N_fixed (was ignored: fact 1)."""
    b, lp = _filled(actor)
    mu = 0.3
    g = _grad(actor, b, _algo(chord_mu=mu), _rfpo("weighted"))
    pg = _pg_coefs(b, lp, _ppo_grad("weighted"), R=_R(b))
    fixed = b.is_fixed.tolist()
    n_fix = sum(int(b.mask_of(i).sum()) for i in range(len(b)) if fixed[i])
    coefs = []
    for i, (m, l, *_rest) in enumerate(_rows(b, lp)):
        sft = [(-math.exp(l[t]) * (1 - math.exp(l[t])) / n_fix if (m[t] and fixed[i]) else 0.0) for t in range(len(m))]
        coefs.append((1 - mu) * pg[i] + mu * torch.tensor(sft, dtype=torch.float64))
    _close(g, _grad_of_coefs(actor, b, coefs))


@pytest.mark.parametrize("mode", ["luffy", "guide"])
def test_offpolicy_shaping_luffy_and_guide(actor, mode):
    """rfpo.offpolicy_shaping / shaping_c: on fixed rows the policy loss is −A·x/(x+c), x = p_t (luffy) or
    exp(logp_t − fix_logp_t) (guide, fix_logp = the engine's log-probs under the fix prompt): d/dlogp =
    −A·c·x/(x+c)² per token; R_off and the clip do not act there; unfixed rows keep the weighted PPO loss."""
    from rfpo_megatron.config import RFPOConfig

    b, lp = _filled(actor)
    c = 0.3
    g = torch.Generator().manual_seed(7)
    b.rollout_logp = [x.float() - 0.6 * torch.rand(x.shape, generator=g) for x in lp]
    b.validate()
    g_on = _grad(actor, b, _algo(), RFPOConfig(loss_form="weighted", offpolicy_shaping=mode, shaping_c=c))
    g_off = _grad(actor, b, _algo(), _rfpo("weighted"))
    pg = _pg_coefs(b, lp, _ppo_grad("weighted"), R=_R(b))
    n = sum(int(b.mask_of(i).sum()) for i in range(len(b)))
    coefs = []
    for i, (m, l, o, a, *_rest) in enumerate(_rows(b, lp)):
        if not bool(b.is_fixed[i]):
            coefs.append(pg[i])
            continue
        f = b.rollout_logp[i].double().tolist()
        xs = [math.exp(l[t]) if mode == "luffy" else math.exp(l[t] - f[t]) for t in range(len(m))]
        coefs.append(torch.tensor([-a[t] * c * xs[t] / (xs[t] + c) ** 2 / n if m[t] else 0.0
                                   for t in range(len(m))], dtype=torch.float64))
    _close(g_on, _grad_of_coefs(actor, b, coefs))
    assert float((g_on - g_off).norm()) > 1e-2 * float(g_off.norm())
    if mode == "guide":  # a fixed row without the engine's log-probs is refused, naming the rows
        b.rollout_logp[1] = torch.full_like(b.rollout_logp[1], float("nan"))
        with pytest.raises(ValueError, match=r"fixed rows \[1\]"):
            _grad(actor, b, _algo(), RFPOConfig(loss_form="weighted", offpolicy_shaping=mode, shaping_c=c))


def _loss_grad(name, form):
    """d L_t / d logp_t of the per-token references, in any RFPO form (weighted: R × base)."""
    def base(l, o, a, R, f):
        if name == "cispo":
            return ref.ref_cispo_tok(l, o, a, R, f, el=EL, eh=EH)[1]
        if name == "aspo":
            return ref.ref_aspo_tok(l, o, a, R, f, el=EL, eh=EH, c=C)[1]
        if name == "ecpo":
            return ref.ref_ecpo_tok(l, o, a, R, f, el=EL, eh=EH, delta=0.1)[1]
        if name == "reinforce_loss":
            return ref.ref_reinforce_tok(l, o, a, R, f)[1]
        raise AssertionError(name)

    def f(i, l, o, a, R):
        return R * base(l, o, a, 1.0, "corrected") if form == "weighted" else base(l, o, a, R, form)
    return f


@pytest.mark.parametrize("name", ["cispo", "aspo", "ecpo", "reinforce_loss"])
@pytest.mark.parametrize("form", ["faithful", "corrected", "weighted"])
def test_other_policy_losses_and_forms(actor, name, form):
    """algo.policy_loss (cispo, aspo with algo.clip_ratio_c, ecpo with algo.ecpo_delta, reinforce_loss) x rfpo.loss_form."""
    b, lp = _filled(actor)
    kw = dict(policy_loss=name)
    if name == "aspo":
        kw["clip_ratio_c"] = C
    if name == "reinforce_loss":
        kw.update(clip_ratio_low=None, clip_ratio_high=None)
    g = _grad(actor, b, _algo(**kw), _rfpo(form))
    _close(g, _grad_of_coefs(actor, b, _pg_coefs(b, lp, _loss_grad(name, form), R=_R(b))))


@pytest.mark.parametrize("form", ["faithful", "weighted"])
def test_gspo_own_defaults_and_sequence_gradient(actor, form):
    """algo.policy_loss=gspo with clip ratios / aggregation left null: GSPO's 3e-4 / 4e-4 and
    seq-mean-token-mean (issue 14 fact 10). Token gradient −A·s_i (inside the clip) / (|o_i|·N_seq), s_i the
    sequence ratio exp(mean_t(logp − old)); the clipped branch has none."""
    from rfpo_megatron.config import AlgoConfig

    b, lp = _filled(actor)
    # small ratio noise so both sides of the tiny GSPO range occur
    shift = [1e-3, -1e-3, 1e-4, -1e-4, 5e-4, 0.0]  # sequence ratio s_i = exp(shift_i): outside / inside the range
    b.old_logp = [(x - d).float() for x, d in zip(lp, shift)]
    b.validate()
    algo = AlgoConfig(policy_loss="gspo", max_response_len=MAX_RESPONSE_LEN)
    assert algo.clip_ratio_low is None and algo.loss_agg_mode is None  # not set by the user
    g = _grad(actor, b, algo, _rfpo(form))
    norms = _norms(b, "seq-mean-token-mean")
    R = _R(b)
    coefs, clipped = [], 0
    for i, (m, l, o, a, _, _) in enumerate(_rows(b, lp)):
        idx = [t for t in range(len(m)) if m[t]]
        s = math.exp(sum(l[t] - o[t] for t in idx) / len(idx))
        x, Ac = (s, a[0]) if form == "weighted" else (s * R[i], a[0] * R[i])
        l1, l2 = -a[0] * x, -Ac * ref.clip(x, 1 - 3e-4, 1 + 4e-4)
        gtok = -a[0] * x if l1 >= l2 else (-Ac * x if 1 - 3e-4 < x < 1 + 4e-4 else 0.0)
        clipped += l1 < l2
        if form == "weighted":
            gtok *= R[i]
        coefs.append(torch.tensor([gtok * norms[i] if m[t] else 0.0 for t in range(len(m))], dtype=torch.float64))
    assert 0 < clipped < len(b)
    _close(g, _grad_of_coefs(actor, b, coefs))


def test_entropy_coeff_is_linear_and_follows_the_entropy_gradient(actor):
    """algo.entropy_coeff: G(c) − G(0) = −c·∇θ agg(H). Checked: linear in c, and the directional derivative of
    agg(H) along d = G(c) − G(0) (central finite difference of the actor's entropies) equals −<d, d>/c."""
    b, lp = _filled(actor, roff=False)
    g0 = _grad(actor, b, _algo())
    g1 = _grad(actor, b, _algo(entropy_coeff=0.05))
    g2 = _grad(actor, b, _algo(entropy_coeff=0.1))
    d = g1 - g0
    _close(g2 - g0, 2 * d, tol=1e-3)  # differences of fp32 gradients
    params = [p for m in actor.model for p in m.parameters()]
    n_tok = sum(int(b.mask_of(i).sum()) for i in range(len(b)))

    def h_agg():
        _, ent = actor.compute_logprobs(b, compute_entropy=True)
        return sum(float((e.double() * b.mask_of(i)).sum()) for i, e in enumerate(ent)) / n_tok

    eps = 1e-2 / float(d.norm())
    dirs, off = [], 0
    for p in params:
        dirs.append(d[off: off + p.numel()].reshape(p.shape).to(p.dtype))
        off += p.numel()
    with torch.no_grad():
        for p, v in zip(params, dirs):
            p.add_(eps * v)
        hp = h_agg()
        for p, v in zip(params, dirs):
            p.sub_(2 * eps * v)
        hm = h_agg()
        for p, v in zip(params, dirs):
            p.add_(eps * v)
    fd = (hp - hm) / (2 * eps)
    want = -float(d @ d) / 0.05
    assert fd == pytest.approx(want, rel=2e-2)


@pytest.mark.parametrize("form", ["faithful", "corrected", "weighted"])
def test_roff_one_is_the_base_algorithm_bit_for_bit(actor, form):
    """R_off ≡ 1 (log_roff all 0) gives exactly the gradient of the run without R_off, in every form."""
    b, _ = _filled(actor, roff=False)
    g_base = _grad(actor, b, _algo(clip_ratio_c=C))
    b.log_roff = torch.zeros(len(b))
    b.validate()
    assert torch.equal(_grad(actor, b, _algo(clip_ratio_c=C), _rfpo(form)), g_base)


def test_triton_loss_kernel_in_a_real_train_step_equals_torch(actor, monkeypatch):
    """actor.use_fused_kernels: the train step's token loss through the Triton loss kernel (TRITON_INTERPRET=1
    on CPU) equals the torch path to ≤ 1e-6 (loss and gradient)."""
    pytest.importorskip("triton")
    b, _ = _filled(actor)
    b.tis_weights = [0.5 + 0.1 * torch.arange(len(x)).float() / len(x) for x in b.old_logp]
    b.validate()
    algo = _algo(clip_ratio_c=C)
    monkeypatch.setenv("RFPO_KERNEL_BACKEND", "torch")
    actor._grads.clear()
    m_t = actor.train_step(b, algo, _rfpo("weighted"))
    g_t = torch.cat([x.reshape(-1) for x in actor._grads[-1]])
    monkeypatch.setenv("RFPO_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from rfpo_megatron.kernels import loss as kloss

    calls = []
    orig = kloss._TokenLoss.apply

    def spy(*args):
        calls.append(args[9])  # triton_path flag
        return orig(*args)

    monkeypatch.setattr(kloss._TokenLoss, "apply", spy)
    actor._grads.clear()
    m_k = actor.train_step(b, algo, _rfpo("weighted"))
    g_k = torch.cat([x.reshape(-1) for x in actor._grads[-1]])
    assert calls and all(calls)  # the kernel ran, on the Triton path
    assert abs(m_k["train/loss"] - m_t["train/loss"]) <= 1e-6
    assert float((g_k - g_t).abs().max()) <= 1e-6
