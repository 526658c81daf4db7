"""The 32B-72B actor paths on CPU over gloo, each against its plain twin on the same weights (issue 13).

World A (2 ranks) runs, in order:
  TP=1 x DP=2  plain vs distributed optimizer (fp32, and bf16 params with fp32 main grads), 3 steps each;
               megatron's CPU-Adam offload (HybridDeviceOptimizer) vs the bf16 distributed optimizer, 3 steps;
               a dist-format checkpoint of the distributed optimizer after step 1
  TP=2         sequence parallel off vs on (odd sequence lengths: padded to a multiple of TP);
               activation recompute none / selective / full (uniform and block): the DP-reduced gradient buffers;
               the DP=2 checkpoint loaded at DP=1: the next step equals the uninterrupted DP=2 run
World B (4 ranks): TP=2 x PP=2 sequence parallel off vs on.
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
    vocab_size=250,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=64,
)
LENGTHS = [(3, 9), (2, 6), (6, 9), (1, 6), (4, 5), (5, 8)]  # odd totals 15, 11, 9: padded under SP
STEPS = 3


def _batch(seed: int):
    from rfpo_megatron.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, HF["vocab_size"], (p + r,), generator=g) for p, r in LENGTHS]
    b = ActorBatch(input_ids=ids, prompt_lens=[p for p, _ in LENGTHS])
    b.advantages = [torch.randn(r, generator=g) for _, r in LENGTHS]
    return b


def _actor(tp, pp=1, **kw):
    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.config import ActorConfig

    kw.setdefault("use_distributed_optimizer", False)
    cfg = ActorConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, max_tokens_per_gpu=40,
                      lr=1e-2, min_lr=1e-3, lr_decay_style="linear", weight_decay=0.01, adam_eps=1e-3,
                      clip_grad=1.0, **kw)
    return Actor(HF, cfg, total_steps=4)


def _algo():
    from rfpo_megatron.config import AlgoConfig

    return AlgoConfig(policy_loss="ppo", loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28)


def _full(actor):
    from rfpo_megatron.convert.sharding import gather_full_state

    return {k: v.detach().float().clone() for k, v in gather_full_state(actor.modules, vocab_size=HF["vocab_size"]).items()}


def _load(actor, s0):
    from rfpo_megatron.convert.sharding import load_full_state

    load_full_state(actor.modules, s0, vocab_size=HF["vocab_size"])


def _steps(actor, n=STEPS, *, first_seed=1):
    """n train steps on fresh batches (old log-probs from the actor itself); returns the metrics of each."""
    out = []
    for k in range(n):
        b = _batch(first_seed + k)
        b.old_logp = actor.compute_logprobs(b)[0]
        out.append(actor.train_step(b, _algo()))
    return out


def _grad_buffers(actor):
    return torch.cat([buf.grad_data.detach().float().clone() for m in actor.model for buf in m.buffers])


def _optimizer_facts(actor):
    """What megatron built: optimizer classes, offload fraction, where the fp32 copies live."""
    inner = list(getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]))
    facts = {"outer": [type(o).__name__ for o in inner],
             "inner": [type(o.optimizer).__name__ for o in inner],
             "precision_aware": [bool(o.config.use_precision_aware_optimizer) for o in inner],
             "offload_fraction": [getattr(o.optimizer, "offload_fraction", None) for o in inner]}
    hdo = [o.optimizer for o in inner if type(o.optimizer).__name__ == "HybridDeviceOptimizer"]
    if hdo:
        h = hdo[0]
        facts["device_optimizer"] = h.gpu_optimizer is not None
        facts["host_copies"] = len(h.cpu_copys_map_gpu_param)
        facts["host_copy_devices"] = sorted({str(p.device) for p in h.cpu_copys_map_gpu_param})
        facts["host_copy_dtypes"] = sorted({str(p.dtype) for p in h.cpu_copys_map_gpu_param})
        facts["model_param_dtypes"] = sorted({str(p.dtype) for p in h.cpu_copys_map_gpu_param.values()})
    return facts


def _w_a(rank, tmp):
    from rfpo_megatron.actor.checkpoint import load_actor_state, save_actor_state
    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel

    out = {}
    init_parallel(tp=1, pp=1, seed=5)  # TP=1 x DP=2
    a = _actor(1)
    s0 = _full(a)
    out["plain"] = (_steps(a), _full(a))
    del a
    a = _actor(1, use_distributed_optimizer=True)
    _load(a, s0)
    m1 = _steps(a, 1)
    out["dist_s1"] = _full(a)
    save_actor_state(a, os.path.join(tmp, "ckpt"), fmt="dist")
    m23 = _steps(a, STEPS - 1, first_seed=2)
    out["dist"] = (m1 + m23, _full(a))
    out["dist_opt"] = _optimizer_facts(a)
    del a
    for name, kw in (("plain_bf16", {}), ("dist_bf16", dict(use_distributed_optimizer=True)),
                     ("offload_bf16", dict(optimizer_cpu_offload=True, use_distributed_optimizer=None))):  # None: offload sets it
        a = _actor(1, bf16=True, **kw)
        _load(a, s0)
        out[name] = (_steps(a), _full(a))
        out[name + "_opt"] = _optimizer_facts(a)
        out[name + "_dtype"] = str(next(a.modules[0].parameters()).dtype)
        del a
    destroy_parallel(keep_process_group=True)

    init_parallel(tp=2, pp=1, seed=5)
    logits_in = torch.randint(0, HF["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    for sp in (False, True):
        a = _actor(2, sequence_parallel=sp)
        _load(a, s0)
        out[f"sp{int(sp)}_cfg"] = bool(a.modules[0].config.sequence_parallel)
        out[f"sp{int(sp)}_logits"] = a.forward_logits(logits_in)
        out[f"sp{int(sp)}_logp"] = a.compute_logprobs(_batch(9))[0]
        out[f"sp{int(sp)}"] = (_steps(a, 1), _full(a))
        del a
    for name, kw in (("none", {}), ("selective", dict(recompute="selective")),
                     ("full_uniform", dict(recompute="full", recompute_method="uniform", recompute_num_layers=2)),
                     ("full_block", dict(recompute="full", recompute_method="block", recompute_num_layers=1))):
        a = _actor(2, sequence_parallel=True, **kw)
        _load(a, s0)
        out[f"rc_{name}_granularity"] = a.modules[0].config.recompute_granularity
        _steps(a, 1)
        out[f"rc_{name}"] = _grad_buffers(a)
        del a
    # the DP=2 distributed-optimizer checkpoint, loaded at TP=2 x DP=1
    a = _actor(2, use_distributed_optimizer=True)
    load_actor_state(a, os.path.join(tmp, "ckpt"))
    out["loaded"] = _full(a)
    out["resumed"] = (_steps(a, STEPS - 1, first_seed=2), _full(a))
    return out


def _w_b(rank):
    from rfpo_megatron.actor.parallel import init_parallel

    init_parallel(tp=2, pp=2, seed=5)
    out = {}
    s0 = None
    for sp in (False, True):
        a = _actor(2, 2, sequence_parallel=sp)
        if s0 is None:
            s0 = _full(a)
        _load(a, s0)
        out[f"sp{int(sp)}_logits"] = a.forward_logits(
            torch.randint(0, HF["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3)))
        out[f"sp{int(sp)}_logp"] = a.compute_logprobs(_batch(9))[0]
        out[f"sp{int(sp)}"] = (_steps(a, 1), _full(a))
        del a
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("scale"))
    return {"a": spawn_world(_w_a, 2, tmp, timeout_s=900), "b": spawn_world(_w_b, 4, timeout_s=900)}


def _maxdiff(x, y):
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        return max(_maxdiff(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return max(_maxdiff(u, v) for u, v in zip(x, y))
    return float((x.double() - y.double()).abs().max())


def _same_metrics(m1, m2, rel=1e-5):
    for a, b in zip(m1, m2):
        for k in ("train/loss", "train/pg_loss", "train/grad_norm"):
            assert abs(a[k] - b[k]) <= rel * max(1.0, abs(b[k])), (k, a[k], b[k])


def test_sequence_parallel_equals_plain_tp2(worlds):
    w = worlds["a"][0]
    assert w["sp0_cfg"] is False and w["sp1_cfg"] is True  # megatron really built SP
    assert any((p + r) % 2 for p, r in LENGTHS)  # lengths SP must pad
    assert _maxdiff(w["sp0_logits"], w["sp1_logits"]) <= 1e-6  # T = 11, padded to 12
    assert _maxdiff(w["sp0_logp"], w["sp1_logp"]) <= 1e-6
    _same_metrics(w["sp0"][0], w["sp1"][0])
    assert _maxdiff(w["sp0"][1], w["sp1"][1]) <= 1e-5
    assert _maxdiff(worlds["a"][0]["sp1"][1], worlds["a"][1]["sp1"][1]) == 0.0  # TP ranks agree


def test_sequence_parallel_equals_plain_tp2_pp2(worlds):
    w = worlds["b"][0]
    assert _maxdiff(w["sp0_logits"], w["sp1_logits"]) <= 1e-6
    assert _maxdiff(w["sp0_logp"], w["sp1_logp"]) <= 1e-6
    _same_metrics(w["sp0"][0], w["sp1"][0])
    assert _maxdiff(w["sp0"][1], w["sp1"][1]) <= 1e-5


def test_distributed_optimizer_equals_plain_dp2(worlds):
    w = worlds["a"][0]
    assert w["dist_opt"]["outer"] == ["DistributedOptimizer"]
    _same_metrics(w["plain"][0], w["dist"][0])
    assert _maxdiff(w["plain"][1], w["dist"][1]) <= 1e-6
    assert _maxdiff(w["plain"][1], {k: v * 0 for k, v in w["plain"][1].items()}) > 0


def test_bf16_distributed_optimizer_equals_plain_bf16(worlds):
    w = worlds["a"][0]
    assert w["plain_bf16_dtype"] == w["dist_bf16_dtype"] == "torch.bfloat16"
    assert w["plain_bf16_opt"]["outer"] == ["Float16OptimizerWithFloat16Params"]
    assert w["dist_bf16_opt"]["outer"] == ["DistributedOptimizer"]
    _same_metrics(w["plain_bf16"][0], w["dist_bf16"][0])
    # Equal but for a few bf16 roundings: with oneDNN's AVX-512 kernels (AMD EPYC, 2026-12-02) 8 of 155,968
    # weights differ (max 6.1e-5, mean 3e-9) after 3 steps, with ONEDNN_MAX_CPU_ISA=AVX2 none; bf16 against the
    # fp32 run differs in every weight (mean 5.5e-5). So: almost no weight differs, and the mean difference is a
    # small fraction of what bf16 itself changes.
    plain, dist, fp32 = (torch.cat([d[k].double().flatten() for k in sorted(d)])
                         for d in (w["plain_bf16"][1], w["dist_bf16"][1], w["plain"][1]))
    diff, bf16_effect = (plain - dist).abs(), (plain - fp32).abs()
    assert float((diff > 1e-6).double().mean()) <= 1e-3
    assert float(diff.mean()) <= 1e-2 * float(bf16_effect.mean())
    # bf16 training really is bf16: it moved away from the fp32 run
    assert float((bf16_effect > 1e-6).double().mean()) > 0.5


def test_cpu_adam_offload_is_megatrons_hybrid_optimizer_and_equals_device_adam(worlds):
    w = worlds["a"][0]
    f = w["offload_bf16_opt"]
    assert f["outer"] == ["DistributedOptimizer"] and f["inner"] == ["HybridDeviceOptimizer"]
    assert f["offload_fraction"] == [1.0] and f["precision_aware"] == [True]
    assert f["device_optimizer"] is False and f["host_copies"] > 0  # every shard stepped on the host
    assert f["host_copy_devices"] == ["cpu"] and f["host_copy_dtypes"] == ["torch.float32"]
    assert f["model_param_dtypes"] == ["torch.bfloat16"]
    _same_metrics(w["dist_bf16"][0], w["offload_bf16"][0])
    assert _maxdiff(w["dist_bf16"][1], w["offload_bf16"][1]) <= 1e-6


def test_recompute_modes_give_identical_gradients(worlds):
    w = worlds["a"][0]
    assert w["rc_none_granularity"] is None and w["rc_selective_granularity"] == "selective"
    assert w["rc_full_uniform_granularity"] == w["rc_full_block_granularity"] == "full"
    for name in ("selective", "full_uniform", "full_block"):
        assert _maxdiff(w["rc_none"], w[f"rc_{name}"]) <= 1e-7, name
    assert float(w["rc_none"].abs().max()) > 0


def test_distributed_optimizer_checkpoint_resumes_at_another_dp(worlds):
    w = worlds["a"][0]
    assert _maxdiff(w["dist_s1"], w["loaded"]) == 0.0
    _same_metrics(w["dist"][0][1:], w["resumed"][0])
    assert _maxdiff(w["dist"][1], w["resumed"][1]) <= 1e-5
