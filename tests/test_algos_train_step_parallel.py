"""One representative of the loss knobs at TP = 2 x PP = 2 (4 real gloo processes): the whole objective
(weighted R_off, dual clip, TIS, k3+ KL loss, entropy bonus, VAPO positive NLL, CHORD, seq-mean-token-mean)
through `Actor.train_step` gives the same gradient as TP = 1 (gathered full gradients, relative error < 1e-4),
and that TP = 1 gradient equals the float64-coefficient reference of tests/test_algos_train_step_knobs.py
(done there). Compared on gradients, not on weights after Adam."""
from __future__ import annotations

import os

import pytest
import torch

from rfpo_megatron.actor.launch import spawn_world

HF = dict(model_type="qwen2", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
          intermediate_size=48, vocab_size=61, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
          max_position_embeddings=64)
LENGTHS = [(3, 7), (2, 5), (4, 9), (1, 6), (3, 4), (2, 8)]


def _batch(actor):
    from rfpo_megatron.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, HF["vocab_size"], (p + r,), generator=g) for p, r in LENGTHS]
    b = ActorBatch(input_ids=ids, prompt_lens=[p for p, _ in LENGTHS])
    lp, _ = actor.compute_logprobs(b)
    b.old_logp = [x + 0.35 * torch.randn(x.shape, generator=g) for x in lp]
    b.advantages = [torch.full(x.shape, a) for x, a in zip(lp, [1.3, -0.7, 0.4, -1.1, 0.9, -0.3])]
    b.ref_logp = [x + 0.5 * torch.randn(x.shape, generator=g) for x in lp]
    b.tis_weights = [0.5 + torch.rand(x.shape, generator=g) for x in lp]
    b.response_mask = [torch.ones(x.numel(), dtype=torch.bool) for x in lp]
    b.response_mask[2][:2] = False
    b.log_roff = torch.tensor([0.0, 0.9, 0.0, 0.0, -1.2, 0.0])
    b.is_fixed = torch.tensor([False, True, False, False, True, False])
    b.is_positive = torch.tensor([True, False, False, False, True, False])
    b.validate()
    return b


VARIANTS = {
    "plain": dict(),
    "entropy": dict(entropy_coeff=0.01),
    "kl": dict(use_kl_loss=True, kl_loss_coef=0.2, kl_loss_type="k3+"),
    "nll_chord": dict(pos_nll_coef=0.3, chord_mu=0.2),
    "all": dict(use_kl_loss=True, kl_loss_coef=0.2, kl_loss_type="k3+", entropy_coeff=0.01, pos_nll_coef=0.3,
                chord_mu=0.2),
}


def _algo(variant="all"):
    from rfpo_megatron.config import AlgoConfig

    return AlgoConfig(policy_loss="ppo", loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28,
                      clip_ratio_c=3.0, **VARIANTS[variant])


def _world(rank, tp, pp, tmp):
    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.config import ActorConfig, RFPOConfig
    from rfpo_megatron.convert.sharding import gather_full_state, load_full_state

    init_parallel(tp=tp, pp=pp, seed=3)
    a = Actor(HF, ActorConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, micro_batch_size=2,
                              lr=1e-3, clip_grad=0.0))
    path = os.path.join(tmp, "s0.pt")
    if tp * pp == 1:
        torch.save(gather_full_state(a.modules, vocab_size=HF["vocab_size"]), path)
    else:
        load_full_state(a.modules, torch.load(path), vocab_size=HF["vocab_size"])
    a.optimizer.reload_model_params()
    a._param_sync_pending = False
    holder = {}

    def step():  # gradients into the weights' places, gathered to full tensors by the converter
        with torch.no_grad():
            saved = [p.detach().clone() for m in a.model for p in m.parameters()]
            for m in a.model:
                for p in m.parameters():
                    p.copy_(p.main_grad.to(p.dtype))
            # clone: at TP = 1 the gathered tensors may be views of the parameters restored below
            holder["grad"] = {k: v.clone() for k, v in gather_full_state(a.modules, vocab_size=HF["vocab_size"]).items()}
            for p, s in zip((p for m in a.model for p in m.parameters()), saved):
                p.copy_(s)
        return True, 0.0, None

    a.optimizer.step = step
    out = {}
    batch = _batch(a)
    for v in VARIANTS:
        metrics = a.train_step(batch, _algo(v), RFPOConfig(loss_form="weighted"))
        out[v] = {"grad": {k: x.clone() for k, x in holder["grad"].items()}, "metrics": metrics}
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("knobs_par"))
    one = spawn_world(_world, 1, 1, 1, tmp, timeout_s=600)[0]
    four = spawn_world(_world, 4, 2, 2, tmp, timeout_s=900)
    return one, four


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_pp2_objective_gradient_equals_tp1(worlds, variant):
    one, four = worlds[0][variant], [r[variant] for r in worlds[1]]
    g1 = one["grad"]
    g4: dict = {}
    for r in four:  # each PP stage gathers (over TP) the full tensors of its own layers
        g4.update(r["grad"])
    assert set(g4) == set(g1)
    num = sum(float((g4[k].double() - g1[k].double()).norm() ** 2) for k in g1) ** 0.5
    den = sum(float(g1[k].double().norm() ** 2) for k in g1) ** 0.5
    worst = sorted(((float((g4[k].double() - g1[k].double()).norm() / g1[k].double().norm().clamp(min=1e-30)), k)
                    for k in g1), reverse=True)[:4]
    assert den > 0 and num / den < 1e-4, (num / den, worst, one["metrics"]["train/loss"], four[0]["metrics"]["train/loss"])
    for k in ("train/loss", "train/pg_loss", "train/kl_loss", "train/pos_nll", "train/chord_sft"):
        if k not in one["metrics"]:
            continue
        assert four[0]["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-5, abs=1e-7), k
