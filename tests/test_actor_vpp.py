"""Virtual pipeline parallel (actor.virtual_pipeline_model_parallel_size) on real gloo processes.

One module-scoped fixture runs two spawned worlds and the tests assert on what they returned:

  W1  PP=1 (world 1)          random weights S0 (also written as an HF directory); reference logits, log-probs,
                              one train step; checkpoints C1 (full and dist) after step 1; step 2
  W2  PP=2 x VPP=2 (world 2)  S0 -> HF export tensors; the HF directory loaded -> logits; S0 -> logits, log-probs (4, 3 and 1 micro-batches: 1 < PP is padded), one train
                              step (also with 1 padded micro-batch); checkpoints C2 (full and dist) after step 1;
                              step 2; C1 loaded at VPP=2 -> step 2; then re-initialised at PP=1 (VPP off, DP=2):
                              C2 loaded -> step 2

The model has 4 layers and tied embeddings: chunk 0 of PP rank 0 holds layer 0 and the embedding, chunk 0 of
rank 1 layer 1, chunk 1 of rank 0 layer 2, chunk 1 of rank 1 layer 3 and the (tied) head.
"""

from __future__ import annotations

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
    vocab_size=250,  # padded to 256
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,  # the embedding-grad all-reduce between chunk 0 of rank 0 and chunk 1 of rank 1
    max_position_embeddings=64,
)
LENGTHS = [(3, 9), (2, 5), (6, 14), (1, 6), (4, 4), (5, 11), (2, 13)]  # (prompt, response) per sample
TOKEN_BUDGET = 40  # "pad" layout: 4 micro-batches of different sizes


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


def _cfg(pp, vpp, **kw):
    from rfpo_megatron.config import ActorConfig

    return ActorConfig(
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        max_tokens_per_gpu=kw.pop("max_tokens", TOKEN_BUDGET),
        micro_batch_size=kw.pop("micro_batch_size", 4),
        lr=1e-2,
        min_lr=1e-3,
        lr_decay_style="linear",
        weight_decay=0.01,
        adam_eps=1e-3,
        clip_grad=1.0,
    )


def _actor(pp, vpp, **kw):
    from rfpo_megatron.actor.actor import Actor

    return Actor(HF, _cfg(pp, vpp, **kw), total_steps=4)


def _algo():
    from rfpo_megatron.config import AlgoConfig

    return AlgoConfig(policy_loss="ppo", loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28)


def _full(actor):
    from rfpo_megatron.convert.sharding import gather_full_state

    return {k: v.clone() for k, v in gather_full_state(actor.modules, vocab_size=HF["vocab_size"]).items()}


def _step(actor, batch, old):
    batch.old_logp = old
    return actor.train_step(batch, _algo())


def _load_s0(actor, tmp):
    from rfpo_megatron.convert.sharding import load_full_state

    load_full_state(actor.modules, torch.load(os.path.join(tmp, "S0.pt")), vocab_size=HF["vocab_size"])
    actor.optimizer.reload_model_params()


def _w_reference(rank, tmp):
    from rfpo_megatron.actor.checkpoint import save_actor_state
    from rfpo_megatron.actor.parallel import init_parallel

    out = {}
    try:
        init_parallel(tp=1, pp=1, vpp=2)
        out["init_error"] = None
    except ValueError as err:
        out["init_error"] = str(err)
    init_parallel(tp=1, pp=1, seed=11)
    a = _actor(1, None)
    s0 = _full(a)
    torch.save(s0, os.path.join(tmp, "S0.pt"))
    out.update(s0=s0, logits=a.forward_logits(_logit_inputs()))
    from rfpo_megatron.convert.export import iter_hf_tensors, save_hf

    out["hf"] = {k: v.clone() for k, v in iter_hf_tensors(a.modules, HF)}
    save_hf(a.modules, HF, os.path.join(tmp, "hf"))
    b = _batch(1)
    lp, ent = a.compute_logprobs(b, compute_entropy=True)
    out["logp"], out["entropy"] = lp, ent
    out["old2"] = a.compute_logprobs(_batch(2))[0]  # stale old log-probs (S0) for step 2
    torch.save(out["old2"], os.path.join(tmp, "old2.pt"))
    out["metrics"] = _step(a, b, lp)
    out["after"] = _full(a)
    for fmt in ("full", "dist"):
        save_actor_state(a, os.path.join(tmp, f"c1_{fmt}"), fmt=fmt)
    out["metrics2"] = _step(a, _batch(2), out["old2"])
    out["after2"] = _full(a)
    return out


def _step2_after_load(tmp, name, pp, vpp):
    from rfpo_megatron.actor.checkpoint import load_actor_state

    a = _actor(pp, vpp)
    meta = load_actor_state(a, os.path.join(tmp, name))
    res = {"meta": meta, "step": a.step, "chunks": len(a.modules)}
    res["metrics2"] = _step(a, _batch(2), torch.load(os.path.join(tmp, "old2.pt")))
    res["after2"] = _full(a)
    return res


def _w_vpp(rank, tmp):
    from megatron.core import parallel_state as mpu

    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.actor.checkpoint import save_actor_state
    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel
    from rfpo_megatron.config import ConfigError

    info = init_parallel(tp=1, pp=2, vpp=2, seed=11)
    a = _actor(2, 2)
    _load_s0(a, tmp)
    out = {"info_vpp": info.vpp, "chunks": len(a.modules),
           "layer_numbers": [[int(l.layer_number) for l in m.decoder.layers] for m in a.modules],
           "pre_post": [(bool(m.pre_process), bool(m.post_process)) for m in a.modules],
           "logits": a.forward_logits(_logit_inputs())}
    b = _batch(1)
    lp, ent = a.compute_logprobs(b, compute_entropy=True)
    out["logp"], out["entropy"] = lp, ent
    # other micro-batch counts: 3 (odd, >= PP: a group size of 3) and 1 (< PP: padded with a zero-loss copy)
    for name, mbs in (("logp_3mb", 3), ("logp_1mb", len(LENGTHS))):
        a.cfg.max_tokens_per_gpu, a.cfg.micro_batch_size = None, mbs
        out[name] = a.compute_logprobs(_batch(1))[0]
    a.cfg.max_tokens_per_gpu, a.cfg.micro_batch_size = TOKEN_BUDGET, 4
    from rfpo_megatron.convert.export import iter_hf_tensors
    from rfpo_megatron.convert.hf_load import load_hf_into_model

    out["hf"] = {k: v.clone() for k, v in iter_hf_tensors(a.modules, HF)}  # the weight-sync source
    h = Actor(HF, _cfg(2, 2), with_optimizer=False)
    load_hf_into_model(h.modules, os.path.join(tmp, "hf"))  # HF layer i -> chunk/offset of layer i
    out["logits_hf"] = h.forward_logits(_logit_inputs())
    del h
    out["metrics"] = _step(a, b, lp)
    out["after"] = _full(a)
    for fmt in ("full", "dist"):
        save_actor_state(a, os.path.join(tmp, f"c2_{fmt}"), fmt=fmt)
    out["metrics2"] = _step(a, _batch(2), torch.load(os.path.join(tmp, "old2.pt")))
    out["after2"] = _full(a)
    del a
    # one micro-batch for the whole step: padded to PP micro-batches, the padding adds no gradient
    a = _actor(2, 2, max_tokens=None, micro_batch_size=len(LENGTHS))
    _load_s0(a, tmp)
    out["metrics_pad"] = _step(a, _batch(1), out["logp"])
    out["after_pad"] = _full(a)
    del a
    for fmt in ("full", "dist"):
        out[f"c1_{fmt}"] = _step2_after_load(tmp, f"c1_{fmt}", 2, 2)
    try:
        Actor(dict(HF, num_hidden_layers=6), _cfg(2, 2))
        out["layers_error"] = None
    except ConfigError as err:
        out["layers_error"] = str(err)
    try:
        Actor(HF, _cfg(2, None))
        out["mismatch_error"] = None
    except ValueError as err:
        out["mismatch_error"] = str(err)
    destroy_parallel(keep_process_group=True)
    init_parallel(tp=1, pp=1, seed=11)  # VPP off, DP=2
    assert mpu.get_virtual_pipeline_model_parallel_world_size() is None
    for fmt in ("full", "dist"):
        out[f"c2_{fmt}"] = _step2_after_load(tmp, f"c2_{fmt}", 1, None)
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("actor_vpp"))
    w1 = spawn_world(_w_reference, 1, tmp, timeout_s=400)
    w2 = spawn_world(_w_vpp, 2, tmp, timeout_s=400)
    return {"pp1": w1[0], "vpp": w2}


def _merged(outs, key):
    """Union over ranks of per-PP-stage full-state dicts (equal copies where ranks share a tensor)."""
    merged: dict = {}
    for out in outs:
        src = out
        for k in key.split("/"):
            src = src[k]
        for k, v in src.items():
            if k in merged:
                assert torch.equal(merged[k], v), k
            merged[k] = v
    # tied embeddings: the last stage's head is a copy kept equal to the embedding (PP = 1 has one tensor)
    head = merged.pop("output_layer.weight", None)
    if head is not None:
        assert torch.equal(head, merged["embedding.word_embeddings.weight"])
    return merged


def _maxdiff(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), set(a) ^ set(b)
        return max(_maxdiff(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max(_maxdiff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


def test_chunks_hold_megatrons_interleaved_layers(worlds):
    r0, r1 = worlds["vpp"]
    assert r0["info_vpp"] == 2 and r0["chunks"] == 2
    # megatron's get_transformer_layer_offset: vp_stage * L/vpp + pp_rank * L/(pp*vpp); layer_number is 1-based
    assert r0["layer_numbers"] == [[1], [3]] and r1["layer_numbers"] == [[2], [4]]
    assert r0["pre_post"] == [(True, False), (False, False)]
    assert r1["pre_post"] == [(False, False), (False, True)]


def test_vpp_logits_and_logprobs_equal_pp1(worlds):
    ref = worlds["pp1"]
    assert ref["logits"].shape == (3, 12, HF["vocab_size"])
    for out in worlds["vpp"]:
        assert _maxdiff(out["logits"], ref["logits"]) <= 1e-5
        assert _maxdiff(out["logp"], ref["logp"]) <= 1e-5
        assert _maxdiff(out["entropy"], ref["entropy"]) <= 1e-5
        assert _maxdiff(out["logp_3mb"], ref["logp"]) <= 1e-5
        assert _maxdiff(out["logp_1mb"], ref["logp"]) <= 1e-5


def test_vpp_hf_export_and_load_map_layers(worlds):
    ref = worlds["pp1"]
    merged: dict = {}
    for out in worlds["vpp"]:
        assert not set(out["hf"]) & set(merged)  # each HF tensor comes from exactly one chunk
        merged.update(out["hf"])
    assert _maxdiff(merged, ref["hf"]) == 0.0
    for out in worlds["vpp"]:
        assert _maxdiff(out["logits_hf"], ref["logits"]) <= 1e-5


def test_vpp_train_step_weights_equal_pp1(worlds):
    ref = worlds["pp1"]
    moved = {k: float((ref["after"][k] - ref["s0"][k]).abs().max()) for k in ref["s0"]}
    assert min(moved.values()) > 1e-4, moved  # guards the equalities: every parameter was updated
    for key in ("after", "after_pad"):
        assert _maxdiff(_merged(worlds["vpp"], key), ref["after"]) <= 1e-5, key
    for out in worlds["vpp"]:
        for key in ("metrics", "metrics_pad"):
            assert out[key]["train/grad_norm"] == pytest.approx(ref["metrics"]["train/grad_norm"], rel=1e-5)
            assert out[key]["train/loss"] == pytest.approx(ref["metrics"]["train/loss"], abs=1e-6)
    assert _maxdiff(_merged(worlds["vpp"], "after2"), ref["after2"]) <= 1e-5


@pytest.mark.parametrize("fmt", ["full", "dist"])
def test_checkpoint_vpp2_to_vpp1_and_back(worlds, fmt):
    ref = worlds["pp1"]
    assert ref["metrics2"]["train/ppo_kl"] != 0.0  # stale old log-probs: step 2 depends on the loaded weights
    # saved at PP=1, loaded at PP=2 x VPP=2
    res = [out[f"c1_{fmt}"] for out in worlds["vpp"]]
    assert res[0]["meta"]["format"] == fmt and res[0]["meta"]["pp"] == 1 and res[0]["meta"]["vpp"] is None
    assert res[0]["step"] == 1 and res[0]["chunks"] == 2
    assert _maxdiff(_merged(res, "after2"), ref["after2"]) <= 1e-5
    # saved at PP=2 x VPP=2, loaded at PP=1 (DP=2)
    res = [out[f"c2_{fmt}"] for out in worlds["vpp"]]
    assert res[0]["meta"]["vpp"] == 2 and res[0]["meta"]["pp"] == 2 and res[0]["chunks"] == 1
    for r in res:
        assert _maxdiff(_merged([r], "after2"), ref["after2"]) <= 1e-5
        assert r["metrics2"]["train/loss"] == pytest.approx(ref["metrics2"]["train/loss"], abs=1e-6)
        assert r["metrics2"]["train/lr"] == pytest.approx(ref["metrics2"]["train/lr"])


def test_vpp_errors_name_the_fields(worlds):
    assert "actor.virtual_pipeline_model_parallel_size=2 needs actor.pipeline_model_parallel_size > 1" in (
        worlds["pp1"]["init_error"])
    out = worlds["vpp"][0]
    assert "num_hidden_layers=6" in out["layers_error"]
    assert "actor.virtual_pipeline_model_parallel_size=2" in out["layers_error"]
    assert "actor.virtual_pipeline_model_parallel_size=None differs from init_parallel(vpp=2)" in out["mismatch_error"]


def test_config_field_validation():
    from rfpo_megatron.config import ConfigError, config_from_dict

    cfg = config_from_dict({"actor": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}})
    assert cfg.actor.virtual_pipeline_model_parallel_size == 2
    assert config_from_dict({}).actor.virtual_pipeline_model_parallel_size is None
    with pytest.raises(ConfigError, match="actor.virtual_pipeline_model_parallel_size.*pipeline_model_parallel_size > 1"):
        config_from_dict({"actor": {"virtual_pipeline_model_parallel_size": 2}})
    with pytest.raises(ConfigError, match="actor.virtual_pipeline_model_parallel_size"):
        config_from_dict({"actor": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 0}})


def test_interleaved_group_size_rule():
    from rfpo_megatron.actor.forward import interleaved_group_size

    # megatron 0.16.1: pp <= N <= M and (M % N == 0 or M % N >= pp)
    for pp in (2, 3, 4):
        for m in range(pp, 20):
            n = interleaved_group_size(m, pp)
            assert pp <= n <= m and (m % n == 0 or m % n >= pp), (m, pp, n)
            if m % pp == 0:
                assert n == pp
    with pytest.raises(ValueError):
        interleaved_group_size(1, 2)
