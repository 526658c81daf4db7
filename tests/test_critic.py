"""Critic (PPO value model) on real gloo processes, and PPO with GAE in the tiny trainer.

Worlds (one spawn each; the megatron import is paid once per world):
  W1  TP=1  random trunk + random head S0: values, the clipped value loss vs a float64 loop, one step
            (kept for W2), a 30-step fit to fixed returns
  W2  TP=2  S0 loaded: same values and the same values after one identical step; then that critic is saved in
            the dist and full formats and loaded at PP=2 (same world): same values and the same next step
            (value head and Adam state restored)
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from rfpo_megatron.actor.launch import spawn_world

HF = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
          intermediate_size=96, vocab_size=250, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
          max_position_embeddings=64)
LENGTHS = [(3, 9), (2, 5), (6, 14), (1, 6), (4, 4)]  # (prompt, response) per sample
EPS = 0.2  # cliprange_value


def _batch():
    from rfpo_megatron.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, HF["vocab_size"], (p + r,), generator=g) for p, r in LENGTHS]
    b = ActorBatch(input_ids=ids, prompt_lens=[p for p, _ in LENGTHS])
    b.response_mask = [torch.ones(r, dtype=torch.bool) for _, r in LENGTHS]
    b.response_mask[2][:4] = False
    b.validate()
    return b


def _targets(values):
    """(values_old, returns): old = V + noise (so some tokens clip at EPS), returns in [-1, 1]."""
    g = torch.Generator().manual_seed(5)
    old = [v + 0.5 * torch.randn(v.shape, generator=g) for v in values]
    ret = [2 * torch.rand(v.shape, generator=g) - 1 for v in values]
    return old, ret


def _critic(tp, lr=1e-3, pp=1, sp=False):
    from rfpo_megatron.actor.critic import Critic
    from rfpo_megatron.config import ActorConfig, CriticConfig

    return Critic(HF, ActorConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  max_tokens_per_gpu=40, adam_eps=1e-3, sequence_parallel=sp),
                  CriticConfig(lr=lr, clip_grad=1.0), total_steps=40)


def _w_tp1(rank, tmp):
    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.config import AlgoConfig
    from rfpo_megatron.convert.sharding import gather_full_state, load_full_state

    init_parallel(tp=1, pp=1, seed=11)
    c = _critic(1)
    out = {"head_zero": all(bool((p == 0).all()) for p in c.modules[0].value_head.parameters())}
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in c.modules[0].value_head.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    s0 = {k: v.clone() for k, v in gather_full_state(c.modules, vocab_size=HF["vocab_size"]).items()}
    torch.save(s0, os.path.join(tmp, "S0.pt"))
    b = _batch()
    v = c.compute_values(b)
    old, ret = _targets(v)
    out.update(values=v, old=old, ret=ret, names=sorted(s0))
    out["metrics"] = c.train_step(b, old, ret, cliprange_value=EPS)
    out["after"] = c.compute_values(b)
    out["seq_metrics"] = {}
    # seq-mean-token-mean aggregation, same start weights
    c2 = _critic(1)
    load_full_state(c2.modules, s0, vocab_size=HF["vocab_size"])
    out["seq_metrics"] = c2.train_step(b, old, ret, cliprange_value=EPS,
                                       loss_cfg=AlgoConfig(loss_agg_mode="seq-mean-token-mean"))
    # learning: 30 PPO value steps towards fixed returns (old values refreshed every step, as in training)
    c3 = _critic(1, lr=3e-3)
    load_full_state(c3.modules, s0, vocab_size=HF["vocab_size"])
    losses = []
    for _ in range(30):
        now = c3.compute_values(b)
        losses.append(c3.train_step(b, now, ret, cliprange_value=EPS)["critic/value_loss"])
    out["losses"], out["fit"] = losses, c3.compute_values(b)
    return out


def _w_tp2(rank, tmp, old, ret):
    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.convert.sharding import load_full_state

    init_parallel(tp=2, pp=1, seed=11)
    c = _critic(2)
    load_full_state(c.modules, torch.load(os.path.join(tmp, "S0.pt")), vocab_size=HF["vocab_size"])
    b = _batch()
    out = {"values": c.compute_values(b)}
    out["metrics"] = c.train_step(b, old, ret, cliprange_value=EPS)
    out["after"] = c.compute_values(b)
    # sequence parallel: the value head gathers the sequence-sharded hidden states
    sp = _critic(2, sp=True)
    load_full_state(sp.modules, torch.load(os.path.join(tmp, "S0.pt")), vocab_size=HF["vocab_size"])
    out["sp_on"] = bool(sp.modules[0].config.sequence_parallel)
    out["sp_values"] = sp.compute_values(b)
    out["sp_metrics"] = sp.train_step(b, old, ret, cliprange_value=EPS)
    out["sp_after"] = sp.compute_values(b)
    del sp
    out["ckpt"] = _ckpt_resume(c, tmp, b, old, ret)
    return out


def _ckpt_resume(c, tmp, b, old, ret):
    """W3: critic states (model + value head + Adam state) in both formats: TP=2 save after one step -> PP=2 load."""
    from rfpo_megatron.actor.checkpoint import load_actor_state, save_actor_state
    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel

    paths = {fmt: save_actor_state(c, os.path.join(tmp, f"ck_{fmt}"), fmt=fmt) for fmt in ("dist", "full")}
    out = {"saved": c.compute_values(b)}
    out["step2"] = c.train_step(b, old, ret, cliprange_value=EPS)  # uses the Adam moments of step 1
    out["after2"] = c.compute_values(b)
    out["keys"] = sorted(c.modules[0].sharded_state_dict().keys())
    try:  # megatron's own GPTModel.sharded_state_dict needs the LM head the critic removed
        type(c.modules[0]).sharded_state_dict(c.modules[0])
        out["stock_error"] = None
    except KeyError as err:
        out["stock_error"] = str(err)
    destroy_parallel(keep_process_group=True)
    init_parallel(tp=1, pp=2, seed=11)  # the same layout is resumed by the trainer tests below (both formats)
    for fmt, path in paths.items():
        c2 = _critic(1, pp=2)
        meta = load_actor_state(c2, path)
        res = {"format": meta["format"], "step": c2.step, "values": c2.compute_values(b)}
        res["step2"] = c2.train_step(b, old, ret, cliprange_value=EPS)
        res["after2"] = c2.compute_values(b)
        out[fmt] = res
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("critic"))
    w1 = spawn_world(_w_tp1, 1, tmp, timeout_s=300)[0]
    w2 = spawn_world(_w_tp2, 2, tmp, w1["old"], w1["ret"], timeout_s=300)
    return w1, w2


def _ref_loss(values, old, ret, masks, mode):
    """float64 loop: 0.5*max((V-R)^2, (clip(V, old-EPS, old+EPS)-R)^2), aggregated; and the clip fraction."""
    per_seq, tot, n_tok, n_clip = [], 0.0, 0, 0
    for v, o, r, m in zip(values, old, ret, masks):
        s, n = 0.0, 0
        for t in range(len(v)):
            if not bool(m[t]):
                continue
            V, O, R = float(v[t]), float(o[t]), float(r[t])
            vc = min(max(V, O - EPS), O + EPS)
            a, c = (V - R) ** 2, (vc - R) ** 2
            s += 0.5 * max(a, c)
            n += 1
            n_clip += int(c > a)
        tot, n_tok = tot + s, n_tok + n
        if n:
            per_seq.append(s / n)
    loss = tot / n_tok if mode == "token-mean" else sum(per_seq) / len(per_seq)
    return loss, n_clip / n_tok


def test_value_head_zero_init_and_param_names(worlds):
    w1, _ = worlds
    assert w1["head_zero"]
    assert {"value_head.weight", "value_head.bias"} <= set(w1["names"])
    assert not any(n.startswith("output_layer") for n in w1["names"])


def test_value_loss_matches_float64_loop(worlds):
    w1, _ = worlds
    masks = [m for m in _batch().response_mask]
    want, clipfrac = _ref_loss(w1["values"], w1["old"], w1["ret"], masks, "token-mean")
    m = w1["metrics"]
    assert 0.05 < clipfrac < 0.95  # the clip branch is exercised both ways
    assert m["critic/value_loss"] == pytest.approx(want, rel=1e-5)
    assert m["critic/vf_clipfrac"] == pytest.approx(clipfrac, rel=1e-6)
    n = sum(int(x.sum()) for x in masks)
    assert m["critic/values_mean"] == pytest.approx(sum(float((v * x).sum()) for v, x in zip(w1["values"], masks)) / n, rel=1e-5)
    assert m["critic/returns_mean"] == pytest.approx(sum(float((r * x).sum()) for r, x in zip(w1["ret"], masks)) / n, rel=1e-5)
    assert math.isfinite(m["critic/grad_norm"]) and m["critic/grad_norm"] > 0
    want_seq, _ = _ref_loss(w1["values"], w1["old"], w1["ret"], masks, "seq-mean-token-mean")
    assert abs(want_seq - want) > 1e-3
    assert w1["seq_metrics"]["critic/value_loss"] == pytest.approx(want_seq, rel=1e-5)


def test_critic_learns_fixed_returns(worlds):
    w1, _ = worlds
    losses = w1["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.1 * losses[0], losses  # observed ~0.01
    masks = _batch().response_mask
    err0 = sum(float(((v - r)[m] ** 2).sum()) for v, r, m in zip(w1["values"], w1["ret"], masks))
    err = sum(float(((v - r)[m] ** 2).sum()) for v, r, m in zip(w1["fit"], w1["ret"], masks))
    assert err < 0.25 * err0


def test_tp2_matches_tp1(worlds):
    w1, w2 = worlds
    for rank in (0, 1):
        for a, b in zip(w1["values"], w2[rank]["values"]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        for a, b in zip(w1["after"], w2[rank]["after"]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert w2[rank]["metrics"]["critic/value_loss"] == pytest.approx(w1["metrics"]["critic/value_loss"], rel=1e-5)
        assert w2[rank]["metrics"]["critic/grad_norm"] == pytest.approx(w1["metrics"]["critic/grad_norm"], rel=1e-4)
    moved = max(float((a - b).abs().max()) for a, b in zip(w1["after"], w1["values"]))
    assert moved > 1e-4  # the step changed the values, so "same after one step" is a real check


def test_tp2_sequence_parallel_matches_tp1(worlds):
    w1, w2 = worlds
    for rank in (0, 1):
        assert w2[rank]["sp_on"] is True
        for a, b in zip(w1["values"], w2[rank]["sp_values"]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        for a, b in zip(w1["after"], w2[rank]["sp_after"]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert w2[rank]["sp_metrics"]["critic/value_loss"] == pytest.approx(w1["metrics"]["critic/value_loss"], rel=1e-5)
        assert w2[rank]["sp_metrics"]["critic/grad_norm"] == pytest.approx(w1["metrics"]["critic/grad_norm"], rel=1e-4)


@pytest.mark.parametrize("fmt", ["dist", "full"])
def test_critic_checkpoint_with_value_head_resumes_exactly_at_another_layout(worlds, fmt):
    """A TP=2 critic saved after one step (dist: megatron dist_checkpointing; full: gathered tensors) loads at
    PP=2: the same values, and the next step (Adam moments, LR schedule) gives the same metrics and values as
    the uninterrupted critic."""
    for rank, w in enumerate(worlds[1]):
        out = w["ckpt"]
        assert {"value_head.weight", "value_head.bias"} <= set(out["keys"])
        assert not any(k.startswith("output_layer") for k in out["keys"])
        assert out["stock_error"] == "'output_layer.weight'"
        r = out[fmt]
        assert r["format"] == fmt and r["step"] == 1
        vdiff = max(float((a - b).abs().max()) for a, b in zip(r["values"], out["saved"]))
        adiff = max(float((a - b).abs().max()) for a, b in zip(r["after2"], out["after2"]))
        print(f"critic {fmt} TP=2 -> PP=2: values {vdiff:.2e}, after the next step {adiff:.2e}")
        assert vdiff <= 1e-5 and adiff <= 1e-5, (fmt, rank)
        for k in ("critic/value_loss", "critic/grad_norm", "critic/lr"):
            assert r["step2"][k] == pytest.approx(out["step2"][k], rel=1e-5), (fmt, k)
        moved = max(float((a - b).abs().max()) for a, b in zip(out["after2"], out["saved"]))
        assert moved > 1e-4  # step 2 changed the values


# ------------------------------------------------------------------ trainer end-to-end (PPO with GAE + RFPO)

def _train(assets, out, *flags, nproc: int = 1, **extra):
    """A real trainer subprocess with PPO-GAE (under `torchrun --nproc_per_node nproc` when nproc > 1)."""
    import subprocess
    import sys

    from test_trainer_fixtures import ROOT, run_trainer_cmd, tiny_overrides, trainer_env

    from rfpo_megatron.rollout.procs import free_port

    kv = {"algo.adv_estimator": "gae", "data.reward_fn": "first_char_digit", "data.prompts_per_step": 3,
          "rfpo.fix.attempts": 2, "rfpo.fix.max_per_group": 2, "rollout.colocate": "false",
          "logging.wandb_mode": "disabled", "critic.lr": 1e-3, **extra}
    cmd = run_trainer_cmd([os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml"),
                           *tiny_overrides(assets, out, **kv), *flags])
    if nproc > 1:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *cmd[1:]]
    p = subprocess.run(cmd, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    from rfpo_megatron.logging import read_metrics

    return read_metrics(os.path.join(out, "logs", "metrics.jsonl"))


def _critic_state(ckpt):
    d = os.path.join(ckpt, "critic")
    with open(os.path.join(d, "latest")) as fh:
        return torch.load(os.path.join(d, fh.read().strip(), "model_pp0.pt"))


@pytest.fixture(scope="module")
def gae_run(tmp_path_factory):
    """Assets and an uninterrupted 3-step PPO-GAE trainer run (checkpoint format auto = full on CPU)."""
    from test_trainer_fixtures import build_assets

    root = tmp_path_factory.mktemp("gae")
    assets = build_assets(str(root / "assets"))
    return assets, root, _train(assets, str(root / "full"), **{"trainer.steps": 3})


def test_trainer_gae_with_rfpo_trains_the_critic(gae_run):
    """3 steps of PPO-GAE with the fix stage: finite critic/* metrics, the critic's checkpoint moves (head first,
    trunk from step 2)."""
    _, root, full = gae_run
    assert [r["step"] for r in full] == [1, 2, 3]
    assert any(r["rfpo/fixed_seq_frac"] > 0 for r in full)  # fixed RFPO samples were in the critic's batch
    for r in full:
        for k in ("critic/value_loss", "critic/vf_clipfrac", "critic/values_mean", "critic/returns_mean",
                  "critic/grad_norm"):
            assert math.isfinite(r[k]), (k, r)
    assert full[0]["critic/values_mean"] == 0.0  # zero-initialised value head: V = 0 before the first update
    # V = 0 and gamma = lam = 1: GAE returns = the 0/1 reward on every token, so 0.5*mean(R^2) = 0.5*mean(R)
    assert full[0]["critic/returns_mean"] > 0
    assert full[0]["critic/value_loss"] == pytest.approx(0.5 * full[0]["critic/returns_mean"], rel=1e-5)
    assert full[0]["critic/grad_norm"] > 0
    assert full[1]["critic/values_mean"] != 0.0
    ck = os.path.join(str(root / "full"), "ckpt")
    s1, s2 = _critic_state(os.path.join(ck, "step_000002")), _critic_state(os.path.join(ck, "step_000003"))
    assert float(s1["value_head.weight"].abs().max()) > 0
    trunk = [k for k in s1 if k.startswith("decoder.layers.")]
    assert trunk and any(not torch.equal(s1[k], s2[k]) for k in trunk)


# the slow lane's (40-46 s each): by default the critic's checkpoint round trip in both formats is
# test_critic_checkpoint_with_value_head_resumes_exactly_at_another_layout, the trainer's resume test_trainer_resume
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["full", "dist"])
def test_trainer_gae_save_and_resume_in_both_checkpoint_formats(gae_run, fmt):
    """Interrupted after step 2 (its checkpoint holds actor and critic in trainer.checkpoint_format), resumed for
    step 3: the resumed step's metrics equal the uninterrupted run's (critic value head and Adam state restored)."""
    import json

    assets, root, full = gae_run
    out = str(root / f"part_{fmt}")
    kv = {"trainer.checkpoint_format": fmt}
    _train(assets, out, **kv, **{"trainer.steps": 2})
    ck = os.path.join(out, "ckpt", "step_000002")
    for model in ("actor", "critic"):
        d = os.path.join(ck, model)
        with open(os.path.join(d, "latest")) as fh:
            with open(os.path.join(d, fh.read().strip(), "meta.json")) as m:
                meta = json.load(m)
        assert meta["format"] == fmt, model
        if fmt == "dist":
            assert meta["dist_optimizer_saved"] is True, model
    resumed = _train(assets, out, "--resume", **kv, **{"trainer.steps": 3})
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"}  # noqa: E731
    assert strip(resumed[-1]) == strip(full[-1])


@pytest.mark.slow  # 42 s; the actor's PP 2 trainer run (test_trainer_multirank) stays in the default lane
def test_trainer_gae_pipeline_parallel_matches_single_process(tmp_path):
    """PPO-GAE with RFPO under torchrun, pipeline parallel 2 (critic and actor split over 2 stages, values
    broadcast from the last stage): the step metrics equal the single-process run's (critic/* and train/* up to
    the PP reduction order)."""
    from test_trainer_fixtures import build_assets

    assets = build_assets(str(tmp_path / "assets"))
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"}  # noqa: E731
    one = [strip(r) for r in _train(assets, str(tmp_path / "pp1"), **{"trainer.steps": 2})]
    two = [strip(r) for r in _train(assets, str(tmp_path / "pp2"), nproc=2,
                                    **{"trainer.steps": 2, "actor.pipeline_model_parallel_size": 2})]
    assert [r["step"] for r in two] == [1, 2] and one[1]["critic/values_mean"] != 0.0
    for ra, rb in zip(one, two):
        assert ra.keys() == rb.keys()
        for k in ra:
            if k.startswith(("train/", "critic/")) and not k.endswith(("/lr", "/update_skipped", "/optimizer_steps")):
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)
            else:
                assert rb[k] == ra[k], (ra["step"], k)


def test_critic_config_errors_name_the_field():
    from rfpo_megatron.config import ConfigError, load_config

    assert load_config(None, []).critic.cliprange_value == 0.5
    for kv, field in (("critic.cliprange_value=0", "critic.cliprange_value"), ("critic.lr=-1", "critic.lr"),
                      ("critic.ppo_epochs=0", "critic.ppo_epochs"), ("critic.lrr=1", "critic.lrr")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
            load_config(None, [kv])
        assert "\n" not in str(err.value)
