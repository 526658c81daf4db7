"""Expert parallel in the actor (tiny Qwen3-MoE, gloo): EP 2 vs EP 1 through `Actor.train_step`, and the load-
balancing loss normalised over the whole step like the policy loss.

  W1  1 rank: (a) router-loss value and gradients vs a float64 reference built on transformers'
      Qwen3MoeForCausalLM (megatron's switch load-balancing formula on HF's router logits, autograd);
      (b) a duplicated batch in 1 vs 2 micro-batches gives the same weights (aux loss on). (a) also has the
      router z-loss on; (c) a plain and (d) a full-recompute step on mixed lengths.
  W2  2 ranks: EP = 2 (DP = 2 for the dense part), then EP = 1 (DP = 2) in the same processes: logits and
      weights after one train step (aux loss on); a "full" actor checkpoint saved at EP = 2 resumes at EP = 1
      and the second step equals EP = 2's; then PP = 2 vs W1's one-rank step on the same micro-batches.
"""
from __future__ import annotations

import pytest
import torch

from rfpo_megatron.actor.launch import spawn_world
from tiny_hf import MOE_HF as HF, make_tiny_moe

AUX = 0.1  # large, so that the router loss moves the weights visibly
ZLOSS = 0.01  # router z-loss, on in W1 (a)
EQUAL = [(3, 7)] * 4  # (prompt, response): equal lengths, one unpadded micro-batch (the float64 reference)
MIXED = [(3, 9), (2, 5), (6, 14), (1, 6), (4, 4), (5, 11), (2, 13), (3, 3)]


def _batch(lengths, seed, zero_adv=False):
    from rfpo_megatron.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, HF["vocab_size"], (p + r,), generator=g) for p, r in lengths]
    b = ActorBatch(input_ids=ids, prompt_lens=[p for p, _ in lengths])
    b.advantages = [torch.zeros(r) if zero_adv else torch.randn(r, generator=g) for _, r in lengths]
    return b


def _algo():
    from rfpo_megatron.config import AlgoConfig

    return AlgoConfig(policy_loss="ppo", loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28)


def _actor(hf_dir, ep=1, **kw):
    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.config import ActorConfig
    from rfpo_megatron.convert.hf_load import load_hf_into_model

    cfg = ActorConfig(expert_model_parallel_size=ep, lr=1e-2, adam_eps=1e-3, moe_aux_loss_coef=AUX,
                      micro_batch_size=kw.pop("micro_batch_size", 4), clip_grad=kw.pop("clip_grad", 1.0), **kw)
    a = Actor(HF, cfg, total_steps=2)
    load_hf_into_model(a.modules, hf_dir)
    return a


def _full(actor):
    from rfpo_megatron.convert.sharding import gather_full_state

    return {k: v.clone() for k, v in gather_full_state(actor.modules, vocab_size=HF["vocab_size"]).items()}


def _step(actor, batch):
    batch.old_logp, _ = actor.compute_logprobs(batch)
    return actor.train_step(batch, _algo())


def _w1(rank, hf_dir):
    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.convert.sharding import canonical_params

    init_parallel(tp=1, pp=1, seed=3)
    out = {}
    # (a) zero advantages: the policy loss has no gradient, every gradient is the router loss's
    a = _actor(hf_dir, micro_batch_size=len(EQUAL), clip_grad=0.0, moe_z_loss_coef=ZLOSS)
    out["a_metrics"] = _step(a, _batch(EQUAL, 1, zero_adv=True))
    out["a_grads"] = {n: p.main_grad.detach().clone() for n, p in canonical_params(a.modules)
                      if getattr(p, "main_grad", None) is not None}
    # (b) the batch twice: one micro-batch of 6 vs two identical micro-batches of 3
    dup = MIXED[:3] * 2
    weights = []
    for mbs in (6, 3):
        b = _batch(dup, 2)
        b.input_ids = b.input_ids[:3] * 2
        b.advantages = b.advantages[:3] * 2
        act = _actor(hf_dir, micro_batch_size=mbs)
        out[f"b_metrics_{mbs}"] = _step(act, b)
        weights.append(_full(act))
    out["b_weights"] = weights
    # (c) the reference of W2's PP = 2 step: one rank, the same batch and micro-batches
    c = _actor(hf_dir, micro_batch_size=3)
    out["c_metrics"] = _step(c, _batch(MIXED, 5))
    out["c_weights"] = _full(c)
    # (d) full activation recompute: the router losses are then computed in the backward's re-forward
    d = _actor(hf_dir, micro_batch_size=3, recompute="full")
    out["d_metrics"] = _step(d, _batch(MIXED, 5))
    out["d_weights"] = _full(d)
    return out


def _w2(rank, hf_dir, ckpt):
    from rfpo_megatron.actor.checkpoint import load_actor_state, save_actor_state
    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel

    out = {}
    for ep in (2, 1):
        init_parallel(tp=1, pp=1, ep=ep, seed=3)
        a = _actor(hf_dir, ep=ep, micro_batch_size=3)
        ids = torch.randint(0, HF["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(4))
        out[f"logits_{ep}"] = a.forward_logits(ids)
        if ep == 1:  # the same tokens per expert as EP = 2's (each EP rank's experts get both ranks' tokens)
            out["logits_1_both"] = a.forward_logits(torch.cat([ids, ids]))[:2]
        out[f"metrics_{ep}"] = _step(a, _batch(MIXED, 5))
        out[f"weights_{ep}"] = _full(a)
        if ep == 2:  # checkpoint at EP = 2 (experts and their Adam moments gathered), then a second step
            save_actor_state(a, ckpt, step=1, fmt="full")
            _step(a, _batch(MIXED, 6))
            out["step2_ep2"] = _full(a)
        else:  # the EP = 2 checkpoint resumed at EP = 1: the same second step
            r = _actor(hf_dir, ep=1, micro_batch_size=3)
            load_actor_state(r, ckpt)
            out["resumed_ep1"] = _full(r)
            _step(r, _batch(MIXED, 6))
            out["step2_ep1"] = _full(r)
            del r
        if ep == 2:  # the allgather dispatcher needs equal token blocks on every EP rank: refused with EP
            try:
                _actor(hf_dir, ep=2, moe_token_dispatcher_type="allgather")
            except Exception as exc:  # noqa: BLE001 - the message is asserted
                out["allgather_ep2_error"] = f"{type(exc).__name__}: {exc}"
        else:  # megatron's allgather token dispatcher (EP = 1, PP = 1) gives alltoall's logits and step
            g = _actor(hf_dir, ep=1, micro_batch_size=3, moe_token_dispatcher_type="allgather")
            out["logits_allgather"] = g.forward_logits(ids)
            _step(g, _batch(MIXED, 5))
            out["weights_allgather"] = _full(g)
            del g
        del a
        destroy_parallel(keep_process_group=True)
    init_parallel(tp=1, pp=2, ep=1, seed=3)  # PP = 2: MoE layers on both stages, router losses back through the pipe
    p = _actor(hf_dir, micro_batch_size=3, pipeline_model_parallel_size=2)
    out["pp2_metrics"] = _step(p, _batch(MIXED, 5))
    out["pp2_weights"] = _full(p)
    destroy_parallel(keep_process_group=True)
    return out


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    hf_dir = make_tiny_moe(tmp_path_factory.mktemp("moe_actor") / "hf")
    return {"hf_dir": hf_dir, "w1": spawn_world(_w1, 1, hf_dir, timeout_s=400)[0],
            "w2": spawn_world(_w2, 2, hf_dir, str(tmp_path_factory.mktemp("moe_ckpt")), timeout_s=500)}


def _maxdiff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _float64_router_loss(hf_dir):
    """coef · mean over MoE layers of megatron's load-balancing loss E/(k T²) Σ_e count_e Σ_t p_te, on HF's
    router logits in float64; returns (value without coef, {HF router name: d(total)/dW})."""
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, experts_implementation="eager").train()
    ids = torch.stack(_batch(EQUAL, 1).input_ids)
    logits_per_layer = model(ids, output_router_logits=True).router_logits
    E, k = HF["num_experts"], HF["num_experts_per_tok"]
    losses = []
    for lg in logits_per_layer:
        p = torch.softmax(lg.reshape(-1, E), dim=-1)
        count = torch.zeros(E, dtype=torch.float64).scatter_add_(
            0, p.topk(k, dim=-1).indices.reshape(-1), torch.ones(p.shape[0] * k, dtype=torch.float64))
        T = p.shape[0]
        losses.append(E / (k * T * T) * (count * p.sum(0)).sum())
    z = [torch.logsumexp(lg.reshape(-1, E), dim=-1).square().mean() for lg in logits_per_layer]
    total = AUX * torch.stack(losses).sum() + ZLOSS * torch.stack(z).sum()
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(torch.stack(losses).mean()), float(torch.stack(z).mean()), grads, len(losses)


def test_router_loss_value_and_gradient_match_float64_reference(worlds):
    ref_value, ref_z, ref_grads, n_moe = _float64_router_loss(worlds["hf_dir"])
    assert n_moe == 3  # layers 0, 2, 3 (layer 1 is dense)
    w1 = worlds["w1"]
    got = w1["a_metrics"]["train/moe_aux_loss"]
    assert abs(got - ref_value) <= 1e-6 * abs(ref_value), (got, ref_value)
    print(f"aux {got} vs float64 {ref_value} (rel {abs(got - ref_value) / ref_value:.1e})")
    got_z = w1["a_metrics"]["train/moe_z_loss"]
    assert abs(got_z - ref_z) <= 1e-6 * abs(ref_z), (got_z, ref_z)
    # the routers' gradient is exactly d(coef · aux + z_coef · z)/dW: normalised by the step, not scaled by its
    # token count
    for layer in HF_MOE_LAYERS:
        g = w1["a_grads"][f"decoder.layers.{layer}.mlp.router.weight"].double()
        r = ref_grads[f"model.layers.{layer}.mlp.gate.weight"]
        assert r.abs().max() > 1e-4
        print(f"router {layer}: grad rel diff {(g - r).abs().max().item() / r.abs().max().item():.1e}")
        assert (g - r).abs().max().item() <= 1e-5 * r.abs().max().item() + 1e-9, layer
    # and through the hidden states into the attention (the aux loss back-propagates into earlier layers)
    g = w1["a_grads"]["decoder.layers.0.self_attention.linear_proj.weight"].double()
    r = ref_grads["model.layers.0.self_attn.o_proj.weight"]
    assert (g - r).abs().max().item() <= 1e-5 * r.abs().max().item() + 1e-9


HF_MOE_LAYERS = (0, 2, 3)


def test_router_loss_independent_of_microbatch_split(worlds):
    w1 = worlds["w1"]
    one, two = w1["b_weights"]
    print(f"1 vs 2 micro-batches: weights {_maxdiff(one, two):.1e}")
    assert _maxdiff(one, two) <= 1e-5
    m1, m2 = w1["b_metrics_6"], w1["b_metrics_3"]
    assert abs(m1["train/moe_aux_loss"] - m2["train/moe_aux_loss"]) <= 1e-6
    assert abs(m1["train/loss"] - m2["train/loss"]) <= 1e-6


def test_ep2_equals_ep1_logits_and_step(worlds):
    r0, r1 = worlds["w2"]
    # ≤ 1e-6 absolute (measured 0.0) against EP = 1 run on both ranks' tokens: at EP = 2 each expert multiplies the
    # rows of both ranks, and CPU float32 GEMMs of n vs 2n rows differ in the last bits; against EP = 1 on the rank's
    # own tokens only that holds to 1e-6 of the logits' scale (~2.5; measured 1.4e-6 absolute, 5e-7 relative)
    assert (r0["logits_2"] - r0["logits_1_both"]).abs().max().item() <= 1e-6
    scale = r0["logits_1"].abs().max().item()
    assert (r0["logits_2"] - r0["logits_1"]).abs().max().item() <= 1e-6 * scale
    assert (r1["logits_2"] - r0["logits_2"]).abs().max().item() == 0.0
    assert _maxdiff(r0["weights_2"], r0["weights_1"]) <= 1e-5
    assert _maxdiff(r0["weights_2"], r1["weights_2"]) == 0.0  # every rank gathers the same full state
    for key in ("train/loss", "train/moe_aux_loss", "train/grad_norm"):
        assert abs(r0["metrics_2"][key] - r0["metrics_1"][key]) <= 1e-6, (key, r0["metrics_2"][key], r0["metrics_1"][key])
    print("EP2 vs EP1: logits", (r0["logits_2"] - r0["logits_1_both"]).abs().max().item(),
          (r0["logits_2"] - r0["logits_1"]).abs().max().item(), "weights",
          _maxdiff(r0["weights_2"], r0["weights_1"]), "aux", r0["metrics_2"]["train/moe_aux_loss"])
    assert r0["metrics_2"]["train/moe_aux_loss"] > 0


def test_checkpoint_saved_at_ep2_resumes_at_ep1(worlds):
    r0, _ = worlds["w2"]
    assert _maxdiff(r0["resumed_ep1"], r0["weights_2"]) == 0.0
    print(f"resume EP2 -> EP1: second step weights {_maxdiff(r0['step2_ep1'], r0['step2_ep2']):.1e}")
    assert _maxdiff(r0["step2_ep1"], r0["step2_ep2"]) <= 1e-5  # Adam moments of every expert restored
    assert _maxdiff(r0["step2_ep2"], r0["weights_2"]) > 1e-4


def test_allgather_dispatcher_equals_alltoall(worlds):
    r0, _ = worlds["w2"]
    assert (r0["logits_allgather"] - r0["logits_1"]).abs().max().item() <= 1e-6 * r0["logits_1"].abs().max().item()
    print(f"allgather vs alltoall: logits {(r0['logits_allgather'] - r0['logits_1']).abs().max().item():.1e} "
          f"weights {_maxdiff(r0['weights_allgather'], r0['weights_1']):.1e}")
    assert _maxdiff(r0["weights_allgather"], r0["weights_1"]) <= 1e-5
    err = r0["allgather_ep2_error"]
    assert err.startswith("ConfigError") and "actor.moe_token_dispatcher_type" in err and "alltoall" in err


def test_pp2_step_equals_one_rank(worlds):
    r0, r1 = worlds["w2"]
    ref = worlds["w1"]
    full = {**r0["pp2_weights"], **r1["pp2_weights"]}  # each stage gathers its own layers
    print(f"PP2 vs 1 rank: weights {_maxdiff(full, ref['c_weights']):.1e}")
    assert _maxdiff(full, ref["c_weights"]) <= 1e-5
    for key in ("train/loss", "train/moe_aux_loss"):
        assert abs(r0["pp2_metrics"][key] - ref["c_metrics"][key]) <= 1e-6, key


def test_full_recompute_step_equals_plain(worlds):
    w1 = worlds["w1"]
    print(f"recompute full vs none: weights {_maxdiff(w1['d_weights'], w1['c_weights']):.1e}")
    assert _maxdiff(w1["d_weights"], w1["c_weights"]) <= 1e-6
    assert abs(w1["d_metrics"]["train/moe_aux_loss"] - w1["c_metrics"]["train/moe_aux_loss"]) <= 1e-7
