"""Planner = actor: per-rank bytes of the real megatron buffers the Actor builds vs rfpo_megatron.plan; and the
response-row logits (actor/output_rows.py) against the full-logits path.

One 4-rank gloo world (the megatron import paid once) builds the Actor under several layouts in turn
(``destroy_parallel(keep_process_group=True)`` between them) and reports, per rank:

* DDP buffers: bf16/fp32 param buffer (``param_data``, or the params themselves without the distributed
  optimizer) and fp32 grad buffer (``grad_data``) bytes;
* optimizer: Adam ``exp_avg`` + ``exp_avg_sq`` bytes and fp32 main-param bytes (tensors the optimizer steps
  that are not model storage), after one train step; with ``optimizer_cpu_offload`` those live in megatron's
  HybridDeviceOptimizer (its host fp32 copies and CPU sub-optimizers), reported as host bytes;
* logits: log-probs and one train step with response-row logits vs ``actor.response_rows_only=False``
  (fp32, TP=1 x DP=4, TP=2 x SP x DP=2, PP=2 x DP=2), and the shape / bytes of the logits' gradient.
"""

from __future__ import annotations

import pytest
import torch

from rfpo_megatron.actor.launch import spawn_world
from rfpo_megatron.plan import TrainSettings, rank_state_bytes, shape_from_hf

HF = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
          intermediate_size=96, vocab_size=250, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
          max_position_embeddings=64)
LENGTHS = [(3, 9), (2, 5), (6, 14), (1, 6), (4, 4), (5, 11), (2, 13), (3, 7)]

# name: (tp, pp, actor flags); dp = 4 / (tp * pp). "exact": also compare response-row vs full logits
LAYOUTS = {
    "tp1_dp4_fp32_dist": (1, 1, dict(bf16=False, use_distributed_optimizer=True), True),
    "tp2_sp_dp2_fp32": (2, 1, dict(bf16=False, sequence_parallel=True, use_distributed_optimizer=False), True),
    "pp2_dp2_fp32": (1, 2, dict(bf16=False, use_distributed_optimizer=False), True),
    "tp2_sp_dp2_bf16_dist_bucket": (2, 1, dict(bf16=True, sequence_parallel=True, use_distributed_optimizer=True,
                                               grad_reduce_bucket_size=20000), False),
    "tp2_pp2_bf16_nodist": (2, 2, dict(bf16=True, sequence_parallel=False, use_distributed_optimizer=False), False),
    "pp2_dp2_bf16_offload": (1, 2, dict(bf16=True, optimizer_cpu_offload=True, use_distributed_optimizer=True), False),
    "tp2_sp_dp2_bf16_offload": (2, 1, dict(bf16=True, sequence_parallel=True, optimizer_cpu_offload=True,
                                           use_distributed_optimizer=True), False),
}


def _batch(seed):
    from rfpo_megatron.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, HF["vocab_size"], (p + r,), generator=g) for p, r in LENGTHS]
    b = ActorBatch(input_ids=ids, prompt_lens=[p for p, _ in LENGTHS])
    b.advantages = [torch.randn(r, generator=g) for _, r in LENGTHS]
    return b


def _actor(tp, pp, flags):
    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.config import ActorConfig

    cfg = ActorConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, max_tokens_per_gpu=40,
                      micro_batch_size=4, lr=1e-2, adam_eps=1e-3, clip_grad=1.0, **flags)
    return Actor(HF, cfg, total_steps=2)


def _algo():
    from rfpo_megatron.config import AlgoConfig

    return AlgoConfig(policy_loss="ppo", loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28)


def _storage(t):
    return t.untyped_storage().data_ptr()


def _measure(actor):
    """Bytes of this rank's real buffers (see the module docstring)."""
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    out = dict(weights=0, grads=0, moments=0, main=0, host_moments=0, host_main=0, hybrid=False, fraction=None)
    for m in actor.model:
        for buf in m.buffers + m.expert_parallel_buffers:
            if buf.param_data is not None:
                out["weights"] += buf.param_data.numel() * buf.param_data.element_size()
            else:
                out["weights"] += sum(p.numel() * p.element_size() for p in buf.params)
            out["grads"] += buf.grad_data.numel() * buf.grad_data.element_size()
    model_storage = {_storage(p) for c in actor.modules for p in c.parameters()}
    opts = getattr(actor.optimizer, "chained_optimizers", None) or [actor.optimizer]
    for o in opts:
        inner = o.optimizer
        hybrid = isinstance(inner, HybridDeviceOptimizer)
        subs = inner.sub_optimizers if hybrid else [inner]
        if hybrid:
            out["hybrid"], out["fraction"] = True, inner.offload_fraction
        pre = "host_" if hybrid else ""
        for so in subs:
            for st in so.state.values():
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st:
                        out[pre + "moments"] += st[k].numel() * st[k].element_size()
            for g in so.param_groups:
                for p in g["params"]:
                    if _storage(p) not in model_storage:
                        out[pre + "main"] += p.numel() * p.element_size()
    return out


def _world(rank):
    from megatron.core import parallel_state as mpu

    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel
    from rfpo_megatron.convert.sharding import gather_full_state, load_full_state

    res = {}
    for name, (tp, pp, flags, exact) in LAYOUTS.items():
        init_parallel(tp=tp, pp=pp, seed=5)
        a = _actor(tp, pp, flags)
        row = dict(tp=tp, pp=pp, dp=mpu.get_data_parallel_world_size(), pp_rank=mpu.get_pipeline_model_parallel_rank(),
                   dp_rank=mpu.get_data_parallel_rank())
        b = _batch(1)
        if exact:
            s0 = {k: v.clone() for k, v in gather_full_state(a.modules, vocab_size=HF["vocab_size"]).items()}
            full = _actor(tp, pp, flags)
            load_full_state(full.modules, s0, vocab_size=HF["vocab_size"])
            full.response_rows_only = False
            # the logits' gradient rows: [N, 1, V/tp] (rows only) vs [T, b, V/tp] (full), recorded in backward
            grads = {}
            for key, act in (("rows", a), ("full", full)):
                layer = getattr(act.modules[0], "output_layer", None)
                if layer is not None:
                    grads[key] = []

                    def hook(_m, _i, o, _k=key):
                        if o[0].requires_grad:
                            o[0].register_hook(lambda g, _k=_k: grads[_k].append((tuple(g.shape), g.numel() * g.element_size())))
                    layer.register_forward_hook(hook)
            lp_rows, ent_rows = a.compute_logprobs(b, compute_entropy=True)
            lp_full, ent_full = full.compute_logprobs(b, compute_entropy=True)
            b.old_logp = lp_rows
            m_rows = a.train_step(b, _algo())
            b2 = _batch(1)
            b2.old_logp = lp_rows
            m_full = full.train_step(b2, _algo())
            after_rows = gather_full_state(a.modules, vocab_size=HF["vocab_size"])
            after_full = gather_full_state(full.modules, vocab_size=HF["vocab_size"])
            row["exact"] = dict(
                logp=max(float((x - y).abs().max()) for x, y in zip(lp_rows, lp_full)),
                entropy=max(float((x - y).abs().max()) for x, y in zip(ent_rows, ent_full)),
                loss=abs(m_rows["train/loss"] - m_full["train/loss"]),
                weights=max(float((after_rows[k].float() - after_full[k].float()).abs().max()) for k in after_rows),
                grad_rows=grads.get("rows"), grad_full=grads.get("full"),
                n_resp=sum(r for _, r in LENGTHS),
            )
            del full
        else:
            b.old_logp = a.compute_logprobs(b)[0]
            a.train_step(b, _algo())
        row["real"] = _measure(a)
        res[name] = row
        del a
        destroy_parallel(keep_process_group=True)
    return res


@pytest.fixture(scope="module")
def ranks():
    return spawn_world(_world, 4, timeout_s=900)


def _settings(flags):
    return TrainSettings(param_dtype="bf16" if flags.get("bf16") else "fp32", grad_fp32=True,
                         use_distributed_optimizer=bool(flags.get("use_distributed_optimizer")),
                         optimizer_cpu_offload=bool(flags.get("optimizer_cpu_offload")), overlap_grad_reduce=True,
                         grad_reduce_bucket_size=flags.get("grad_reduce_bucket_size"))


def _close(real, plan, what, tag):
    assert abs(real - plan) <= 0.02 * max(real, plan, 1), f"{tag}: {what} real {real} vs planner {plan}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planner_bytes_equal_real_buffers(ranks, name):
    tp, pp, flags, _ = LAYOUTS[name]
    m = shape_from_hf(HF)
    for rank, res in enumerate(ranks):
        row = res[name]
        real = row["real"]
        st = rank_state_bytes(m, tp, pp, row["pp_rank"], row["dp"], _settings(flags), dp_rank=row["dp_rank"])
        tag = f"{name} rank {rank}"
        _close(real["weights"], st.weights, "params", tag)
        _close(real["grads"], st.grads, "grads", tag)
        if flags.get("optimizer_cpu_offload"):
            # megatron's hybrid CPU optimizer, everything off the accelerator; the planner says host
            assert real["hybrid"] and real["fraction"] == 1.0, tag
            assert real["moments"] == 0 and real["main"] == 0, tag
            assert st.on_host
            _close(real["host_moments"], st.moments, "host Adam moments", tag)
            _close(real["host_main"], st.main_params, "host fp32 main params", tag)
        else:
            assert not real["hybrid"] and not st.on_host, tag
            _close(real["moments"], st.moments, "Adam moments", tag)
            _close(real["main"], st.main_params, "fp32 main params", tag)
        assert st.optimizer == st.moments + st.main_params


@pytest.mark.parametrize("name", [n for n, v in LAYOUTS.items() if v[3]])
def test_response_row_logits_equal_full_logits(ranks, name):
    for rank, res in enumerate(ranks):
        e = res[name]["exact"]
        assert e["logp"] <= 1e-6 and e["entropy"] <= 1e-6, (name, rank, e)
        assert e["loss"] <= 1e-6 and e["weights"] <= 1e-6, (name, rank, e)


@pytest.mark.parametrize("name", [n for n, v in LAYOUTS.items() if v[3]])
def test_logits_gradient_holds_response_rows_only(ranks, name):
    """The logits' gradient in backward: [N_mb, 1, V/tp] per micro-batch (response rows), not [T, b, V/tp]."""
    tp = LAYOUTS[name][0]
    v_local = 256 // tp
    seen = 0
    for res in ranks:
        e = res[name]["exact"]
        if e["grad_rows"] is None:  # not the last pipeline stage
            continue
        seen += 1
        rows = sum(s[0] for s, _ in e["grad_rows"])
        full_rows = sum(s[0] * s[1] for s, _ in e["grad_full"])
        assert all(s[1] == 1 and s[2] == v_local for s, _ in e["grad_rows"]), e["grad_rows"]
        assert rows < full_rows
        # bytes of the logits' gradient: N x V/tp x 4 (fp32 model) summed over this rank's micro-batches
        assert sum(n for _, n in e["grad_rows"]) == rows * v_local * 4
    assert seen
