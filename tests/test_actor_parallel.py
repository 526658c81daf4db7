"""Actor TP/PP/DP equivalence on real gloo processes: logits, packed log-probs, one train step, checkpoint reshard + resume.

One module-scoped fixture runs five spawned worlds in order (the megatron import
is paid once per world) and the tests assert on what they returned:

  W1  TP=1            initial weights S0; reference logits, log-probs, one train step
  W2  TP=2            same weights -> logits, step; save checkpoint C after step 1; step 2
  W3  PP=2            same weights -> logits, step; then load C -> logits, step 2 (resume)
  W4  TP=1 x DP=2     load C -> logits, step 2 (resume across layout, DP gradient sum)
  W5  TP=2 x PP=2     same weights -> logits, step
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from rfpo_megatron.actor.launch import spawn_world

HF = dict(
    model_type="qwen2",
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=4,
    intermediate_size=96,
    vocab_size=250,  # padded to 256: exercises the masked vocab columns
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=64,
)
LENGTHS = [(3, 9), (2, 5), (6, 14), (1, 6), (4, 4), (5, 11), (2, 13)]  # (prompt, response) per sample
TOKEN_BUDGET = 40  # "pad" layout: micro-batches of 3, 1, 2, 1 samples (different sizes)


def _batch(seed: int):
    from rfpo_megatron.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, HF["vocab_size"], (p + r,), generator=g) for p, r in LENGTHS]
    b = ActorBatch(input_ids=ids, prompt_lens=[p for p, _ in LENGTHS])
    b.advantages = [torch.randn(r, generator=g) for _, r in LENGTHS]
    return b


def _logit_inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, HF["vocab_size"], (3, 12), generator=g)


def _actor(tp, pp, **kw):
    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.config import ActorConfig

    cfg = ActorConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        max_tokens_per_gpu=kw.pop("max_tokens", TOKEN_BUDGET),
        micro_batch_size=kw.pop("micro_batch_size", 4),
        lr=1e-2,
        min_lr=1e-3,
        lr_decay_style="linear",
        weight_decay=0.01,
        adam_eps=1e-3,  # keeps Adam's first step Lipschitz in the gradient (no sign() amplification)
        clip_grad=1.0,
    )
    return Actor(HF, cfg, total_steps=4)


def _algo():
    from rfpo_megatron.config import AlgoConfig

    return AlgoConfig(policy_loss="ppo", loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28)


def _full(actor):
    from rfpo_megatron.convert.sharding import gather_full_state

    return {k: v.clone() for k, v in gather_full_state(actor.modules, vocab_size=HF["vocab_size"]).items()}


def _step(actor, batch, old):
    batch.old_logp = old
    return actor.train_step(batch, _algo())


def _w_reference(rank, tmp):
    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.convert.sharding import load_full_state

    init_parallel(tp=1, pp=1, seed=11)
    a = _actor(1, 1)
    s0 = _full(a)
    torch.save(s0, os.path.join(tmp, "S0.pt"))
    out = {"s0": s0, "logits": a.forward_logits(_logit_inputs())}
    b = _batch(1)
    lp, ent = a.compute_logprobs(b, compute_entropy=True)
    out["logp"], out["entropy"] = lp, ent
    # independent reference: each sample alone through forward_logits, float64 log-softmax
    ref_lp, ref_ent = [], []
    for x, p in zip(b.input_ids, b.prompt_lens):
        lg = a.forward_logits(x.unsqueeze(0))[0].double()
        lsm = torch.log_softmax(lg[p - 1 : -1], dim=-1)
        ref_lp.append(lsm.gather(1, x[p:].unsqueeze(1)).squeeze(1))
        ref_ent.append(-(lsm.exp() * lsm).sum(-1))
    out["ref_logp"], out["ref_entropy"] = ref_lp, ref_ent
    # sampling temperature: log-probs of logits / T
    a.temperature = 0.7
    out["logp_t07"] = a.compute_logprobs(b)[0]
    a.temperature = 1.0
    out["ref_logp_t07"] = []
    for x, p in zip(b.input_ids, b.prompt_lens):
        lsm = torch.log_softmax(a.forward_logits(x.unsqueeze(0))[0].double()[p - 1 : -1] / 0.7, dim=-1)
        out["ref_logp_t07"].append(lsm.gather(1, x[p:].unsqueeze(1)).squeeze(1))
    bad = _batch(1)
    bad.input_ids[3][2] = HF["vocab_size"]
    try:
        a.compute_logprobs(bad)
        out["bad_id_error"] = None
    except ValueError as err:
        out["bad_id_error"] = str(err)
    b2 = _batch(2)
    out["old2"] = a.compute_logprobs(b2)[0]  # stale old log-probs (S0) for the resume step
    torch.save(out["old2"], os.path.join(tmp, "old2.pt"))
    out["metrics"] = _step(a, b, lp)
    out["after"] = _full(a)
    # inference-only actor (the reference policy): same log-probs, no optimizer / gradient buffers
    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.config import ActorConfig

    ref = Actor(HF, ActorConfig(max_tokens_per_gpu=TOKEN_BUDGET), with_optimizer=False)
    load_full_state(ref.modules, s0, vocab_size=HF["vocab_size"])
    out["logp_reference_actor"] = ref.compute_logprobs(_batch(1))[0]
    out["reference_has_grad"] = any(p.requires_grad for p in ref.modules[0].parameters())
    del ref
    out["config_errors"] = []
    for bad in (dict(optimizer_cpu_offload=True), dict(optimizer_cpu_offload=True, bf16=True,
                                                       use_distributed_optimizer=False),
                dict(tensor_model_parallel_size=2)):
        try:
            Actor(HF, ActorConfig(**bad))
            out["config_errors"].append(None)
        except ValueError as err:
            out["config_errors"].append(str(err))
    # every loss ingredient at once, checked against a float64 loop in the test
    a3 = _actor(1, 1)
    load_full_state(a3.modules, s0, vocab_size=HF["vocab_size"])
    cb = _composite_batch(lp)
    out["composite_batch"] = cb
    out["composite"] = a3.train_step(cb, _composite_algo(), _rfpo())
    del a3
    # BAPO's adaptive bounds are taken over the whole step batch: the update ignores the split
    from rfpo_megatron.config import AlgoConfig

    for name, kw in (("bapo_budget", {}), ("bapo_per_sample", dict(max_tokens=None, micro_batch_size=1))):
        a4 = _actor(1, 1, **kw)
        load_full_state(a4.modules, s0, vocab_size=HF["vocab_size"])
        out[name] = a4.train_step(_composite_batch(lp), AlgoConfig(policy_loss="bapo"), _rfpo())
        out[name + "_after"] = _full(a4)
        del a4
    # split independence at TP=1: one micro-batch with all samples, and one sample per micro-batch
    for name, kw in (("one_mb", dict(max_tokens=None, micro_batch_size=len(LENGTHS))),
                     ("per_sample", dict(max_tokens=None, micro_batch_size=1))):
        a2 = _actor(1, 1, **kw)
        load_full_state(a2.modules, s0, vocab_size=HF["vocab_size"])
        a2.optimizer.reload_model_params()
        lp2, _ = a2.compute_logprobs(_batch(1))
        out[f"logp_{name}"] = lp2
        out[f"metrics_{name}"] = _step(a2, _batch(1), lp2)
        out[f"after_{name}"] = _full(a2)
        del a2
    return out


def _composite_batch(lp):
    g = torch.Generator().manual_seed(99)
    b = _batch(1)
    b.old_logp = [x + 0.3 * torch.randn(x.shape, generator=g) for x in lp]
    b.ref_logp = [x + 0.2 * torch.randn(x.shape, generator=g) for x in lp]
    b.tis_weights = [0.5 + torch.rand(x.shape, generator=g) for x in lp]
    b.response_mask = [torch.ones(x.numel(), dtype=torch.bool) for x in lp]
    b.response_mask[0][-1] = False
    b.response_mask[2][:3] = False
    log_roff = torch.zeros(len(lp))
    log_roff[2], log_roff[4] = 0.3, -0.5
    b.log_roff = log_roff
    b.is_fixed = log_roff != 0
    b.__post_init__()
    return b


def _composite_algo():
    from rfpo_megatron.config import AlgoConfig

    return AlgoConfig(policy_loss="ppo", loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.2,
                      clip_ratio_high=0.28, clip_ratio_c=3.0, entropy_coeff=0.01, use_kl_loss=True,
                      kl_loss_coef=0.1, kl_loss_type="k3")


def _rfpo():
    from rfpo_megatron.config import RFPOConfig

    return RFPOConfig(loss_form="faithful")


def _load_s0(actor, tmp):
    from rfpo_megatron.convert.sharding import load_full_state

    load_full_state(actor.modules, torch.load(os.path.join(tmp, "S0.pt")), vocab_size=HF["vocab_size"])
    actor.optimizer.reload_model_params()


def _equivalence_run(tp, pp, tmp):
    a = _actor(tp, pp)
    _load_s0(a, tmp)
    out = {"logits": a.forward_logits(_logit_inputs())}
    b = _batch(1)
    lp, ent = a.compute_logprobs(b, compute_entropy=True)
    out["logp"], out["entropy"] = lp, ent
    out["metrics"] = _step(a, b, lp)
    out["after"] = _full(a)
    return a, out


def _w_tp2(rank, tmp):
    from rfpo_megatron.actor.checkpoint import save_actor_state
    from rfpo_megatron.actor.parallel import init_parallel

    init_parallel(tp=2, pp=1, seed=11)
    a, out = _equivalence_run(2, 1, tmp)
    out["ckpt"] = save_actor_state(a, os.path.join(tmp, "ckpt"), extra={"note": "tp2"})
    out["logits_c"] = a.forward_logits(_logit_inputs())
    out["metrics2"] = _step(a, _batch(2), torch.load(os.path.join(tmp, "old2.pt")))
    out["after2"] = _full(a)
    return out


def _resume(tmp):
    from rfpo_megatron.actor.checkpoint import load_actor_state

    a = _actor(*_layout())
    meta = load_actor_state(a, os.path.join(tmp, "ckpt"))
    res = {"meta": meta, "step": a.step, "lr": a.lr(), "logits_c": a.forward_logits(_logit_inputs())}
    res["metrics2"] = _step(a, _batch(2), torch.load(os.path.join(tmp, "old2.pt")))
    res["after2"] = _full(a)
    return a, res


def _layout():
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size()


def _w_pp2_then_resume(rank, tmp):
    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel

    init_parallel(tp=1, pp=2, seed=11)
    a, out = _equivalence_run(1, 2, tmp)
    del a
    a, out["resume_pp2"] = _resume(tmp)
    del a
    destroy_parallel(keep_process_group=True)
    init_parallel(tp=1, pp=1, seed=11)  # TP=1 x DP=2
    a, out["resume_dp2"] = _resume(tmp)
    # one sample for two DP ranks: rank 1 has no micro-batch and must still join the reduction
    one = _batch(3)
    one.input_ids, one.prompt_lens, one.advantages = one.input_ids[:1], one.prompt_lens[:1], one.advantages[:1]
    out["one_sample_adv"] = one.advantages[0]
    out["one_sample"] = _step(a, one, a.compute_logprobs(one)[0])
    return out


def _w_tp2pp2(rank, tmp):
    from rfpo_megatron.actor.parallel import init_parallel

    init_parallel(tp=2, pp=2, seed=11)
    return _equivalence_run(2, 2, tmp)[1]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("actor_par"))
    w1 = spawn_world(_w_reference, 1, tmp, timeout_s=400)
    w2 = spawn_world(_w_tp2, 2, tmp, timeout_s=400)
    w3 = spawn_world(_w_pp2_then_resume, 2, tmp, timeout_s=400)
    w4 = spawn_world(_w_tp2pp2, 4, tmp, timeout_s=400)
    return {"tp1": w1, "tp2": w2, "pp2": w3, "tp2pp2": w4}


def _merged(outs, key):
    """Union over ranks of per-PP-stage full-state dicts (TP ranks of a stage hold equal copies)."""
    merged: dict = {}
    for out in outs:
        for k, v in out[key].items():
            if k in merged:
                assert torch.equal(merged[k], v), k
            merged[k] = v
    return merged


def _maxdiff(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max(_maxdiff(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max(_maxdiff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2pp2"])
def test_logits_equal_tp1(worlds, layout):
    ref = worlds["tp1"][0]["logits"]
    assert ref.shape == (3, 12, HF["vocab_size"])
    for r, out in enumerate(worlds[layout]):
        assert _maxdiff(out["logits"], ref) <= 1e-5, (layout, r)


def test_logprobs_match_float64_reference_and_packing(worlds):
    w = worlds["tp1"][0]
    assert [x.numel() for x in w["logp"]] == [r for _, r in LENGTHS]
    assert _maxdiff(w["logp"], w["ref_logp"]) <= 1e-5
    assert _maxdiff(w["entropy"], w["ref_entropy"]) <= 1e-5
    # packed (budget 40: 4 micro-batches), one micro-batch, one sample per micro-batch
    assert _maxdiff(w["logp"], w["logp_one_mb"]) <= 1e-5
    assert _maxdiff(w["logp"], w["logp_per_sample"]) <= 1e-5
    for layout in ("tp2", "pp2", "tp2pp2"):
        assert _maxdiff(worlds[layout][0]["logp"], w["logp"]) <= 1e-5
        assert _maxdiff(worlds[layout][0]["entropy"], w["entropy"]) <= 1e-5


def test_temperature_and_bad_token_id(worlds):
    w = worlds["tp1"][0]
    assert _maxdiff(w["logp_t07"], w["ref_logp_t07"]) <= 1e-5
    assert _maxdiff(w["logp_t07"], w["logp"]) > 1e-2
    assert "ActorBatch.input_ids[3] holds token id 250 outside the model's vocabulary [0, 250)" in w["bad_id_error"]


def test_first_step_ppo_kl_zero_and_metrics(worlds):
    for layout in ("tp1", "tp2", "pp2", "tp2pp2"):
        for out in worlds[layout]:
            m = out["metrics"]
            assert m["train/ppo_kl"] == 0.0, layout
            assert m["train/pg_clipfrac"] == 0.0
            # ratio == 1 on the first step: pg_loss = -token-mean(A)
            b = _batch(1)
            want = -float(torch.cat(b.advantages).double().mean())
            assert math.isclose(m["train/pg_loss"], want, abs_tol=1e-6), (m["train/pg_loss"], want)
            assert m["train/lr"] == pytest.approx(1e-2)
            assert m["train/grad_norm"] > 1.0  # clipping to 1.0 is active
            ent = torch.cat(worlds["tp1"][0]["ref_entropy"]).mean().item()
            assert m["train/entropy"] == pytest.approx(ent, abs=1e-5)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2pp2"])
def test_train_step_weights_equal_tp1(worlds, layout):
    ref = worlds["tp1"][0]
    assert _maxdiff(_merged(worlds[layout], "after"), ref["after"]) <= 1e-5, layout
    for out in worlds[layout]:
        assert out["metrics"]["train/grad_norm"] == pytest.approx(ref["metrics"]["train/grad_norm"], rel=1e-5)


def test_train_step_independent_of_microbatch_split(worlds):
    w = worlds["tp1"][0]
    for name in ("one_mb", "per_sample"):
        assert _maxdiff(w[f"after_{name}"], w["after"]) <= 1e-5, name
        assert w[f"metrics_{name}"]["train/loss"] == pytest.approx(w["metrics"]["train/loss"], abs=1e-6)


def test_step_changes_weights(worlds):
    # guards the equality tests above against a step that does nothing
    w = worlds["tp1"][0]
    moved = {k: float((w["after"][k] - w["s0"][k]).abs().max()) for k in w["s0"]}
    assert min(moved.values()) > 1e-4, moved  # every parameter was updated
    assert _maxdiff(worlds["tp2"][0]["logits_c"], w["logits"]) > 1e-3


def test_checkpoint_reshard_tp2_to_pp2_and_dp2(worlds):
    tp2 = worlds["tp2"][0]
    for out in worlds["pp2"]:
        for key in ("resume_pp2", "resume_dp2"):
            res = out[key]
            assert res["step"] == 1 and res["meta"]["tp"] == 2 and res["meta"]["extra"] == {"note": "tp2"}
            assert _maxdiff(res["logits_c"], tp2["logits_c"]) <= 1e-5, key
            assert res["lr"] == pytest.approx(tp2["metrics2"]["train/lr"])


def test_resume_next_step_equals_uninterrupted(worlds):
    tp2 = worlds["tp2"][0]
    assert tp2["metrics2"]["train/ppo_kl"] != 0.0  # stale old log-probs: the loss depends on the weights
    for key in ("resume_pp2", "resume_dp2"):
        res = worlds["pp2"][0][key]
        assert res["metrics2"]["train/loss"] == pytest.approx(tp2["metrics2"]["train/loss"], abs=1e-6), key
        assert res["metrics2"]["train/lr"] == pytest.approx(tp2["metrics2"]["train/lr"])
    # Adam moments restored: the second update matches too
    after2 = _merged([w["resume_pp2"] for w in worlds["pp2"]], "after2")
    assert _maxdiff(after2, tp2["after2"]) <= 1e-5
    assert _maxdiff(worlds["pp2"][0]["resume_dp2"]["after2"], tp2["after2"]) <= 1e-5


def test_dp_rank_without_samples_joins_the_step(worlds):
    m0, m1 = (out["one_sample"] for out in worlds["pp2"])
    assert m0 == m1
    assert m0["train/ppo_kl"] == 0.0
    want = -float(worlds["pp2"][0]["one_sample_adv"].double().mean())
    assert m0["train/pg_loss"] == pytest.approx(want, abs=1e-6)


def test_train_step_loss_composition_matches_float64_loop(worlds):
    """ppo + dual clip + R_off (faithful) + TIS + mask + seq-mean-token-mean + entropy + k3 KL."""
    w = worlds["tp1"][0]
    b, m = w["composite_batch"], w["composite"]
    lo, hi, c, ent_coef, kl_coef = 0.8, 1.28, 3.0, 0.01, 0.1
    seq_pg, seq_ent, seq_kl = [], [], []
    n_tok, kl_sum, ent_sum, clipped = 0, 0.0, 0.0, 0
    for i in range(len(b)):
        R = math.exp(float(b.log_roff[i]))
        pg = ent = kl = 0.0
        n = 0
        for t in range(b.response_lens[i]):
            if not bool(b.response_mask[i][t]):
                continue
            lp, old = float(w["logp"][i][t]), float(b.old_logp[i][t])
            A, H = float(b.advantages[i][t]), float(w["entropy"][i][t])
            ratio = math.exp(lp - old) * R
            l1 = -A * ratio
            l2 = -(A * R) * min(max(ratio, lo), hi)
            L = max(l1, l2)
            clipped += int(l2 > l1)
            if A < 0:
                L = min(L, -c * A * R)
            pg += L * float(b.tis_weights[i][t])
            d = float(b.ref_logp[i][t]) - lp
            kl += math.exp(d) - d - 1
            ent += H
            n += 1
            kl_sum += old - lp
            ent_sum += H
        n_tok += n
        seq_pg.append(pg / n)
        seq_ent.append(ent / n)
        seq_kl.append(kl / n)
    pg_loss = sum(seq_pg) / len(seq_pg)
    want = pg_loss - ent_coef * sum(seq_ent) / len(seq_ent) + kl_coef * sum(seq_kl) / len(seq_kl)
    assert m["train/pg_loss"] == pytest.approx(pg_loss, abs=1e-5)
    assert m["train/loss"] == pytest.approx(want, abs=1e-5)
    assert m["train/kl_loss"] == pytest.approx(sum(seq_kl) / len(seq_kl), abs=1e-5)
    assert m["train/ppo_kl"] == pytest.approx(kl_sum / n_tok, abs=1e-5)
    assert m["train/entropy"] == pytest.approx(ent_sum / n_tok, abs=1e-5)
    assert m["train/pg_clipfrac"] == pytest.approx(clipped / n_tok, abs=1e-6)
    assert 0 < clipped < n_tok


def test_reference_actor_and_config_errors(worlds):
    w = worlds["tp1"][0]
    assert _maxdiff(w["logp_reference_actor"], w["logp"]) == 0.0
    assert w["reference_has_grad"] is False
    fp32_offload, no_dist_offload, tp = w["config_errors"]  # CP: refused by the config checks (tests/test_config.py)
    assert "actor.optimizer_cpu_offload=true needs actor.bf16=true" in fp32_offload
    assert "actor.optimizer_cpu_offload=true needs actor.bf16=true" in no_dist_offload
    assert "tensor_model_parallel_size=2" in tp and "init_parallel(tp=1" in tp


def test_bapo_bounds_global_over_the_step(worlds):
    w = worlds["tp1"][0]
    assert _maxdiff(w["bapo_budget_after"], w["bapo_per_sample_after"]) <= 1e-5
    assert w["bapo_budget"]["train/loss"] == pytest.approx(w["bapo_per_sample"]["train/loss"], abs=1e-6)
