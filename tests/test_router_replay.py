"""Rollout routing replay (R3) on megatron's own MoE modules (rfpo_megatron.actor.router_replay).

A tiny megatron GPTModel with MoE layers (local spec, SequentialMLP, allgather dispatcher) is fed packed
micro-batches through the actor's ``forward.run_schedule``. References: a float64 hand computation of the
MoE layer from its captured input and its weights (router logits, softmax over the forced experts, SwiGLU
experts), megatron's own ``RouterReplay`` (REPLAY_FORWARD with ``moe_enable_routing_replay``) for the
log-probs, and a direct count of perturbed routing rows for the mismatch metric.
"""
from __future__ import annotations

import torch

from rfpo_megatron.actor.launch import spawn_world

E, K, LAYERS = 4, 2, 2


def _model(replay_flag: bool = False, **extra):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(
        num_layers=LAYERS, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
        ffn_hidden_size=64, moe_ffn_hidden_size=16, num_moe_experts=E, moe_router_topk=K,
        moe_router_load_balancing_type="none", moe_token_dispatcher_type="allgather", normalization="RMSNorm",
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        qk_layernorm=True, use_cpu_initialization=True, params_dtype=torch.float32, calculate_per_token_loss=True,
        hidden_dropout=0.0, attention_dropout=0.0, moe_router_pre_softmax=False,
        moe_enable_routing_replay=replay_flag, init_method_std=0.2, **extra,
    )
    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False, qk_layernorm=True)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=32,
                    position_embedding_type="rope")


SEQS = [([3, 9, 1, 4], [7, 2, 8]), ([5, 6], [11, 12, 13, 14, 15]), ([1, 2, 3], [4])]


def _logp(model, mbs):
    from rfpo_megatron.actor.forward import logprob_output_fn, run_schedule

    fn = logprob_output_fn(lambda mb, lp, ent: (lp.sum() * 0.0, {"logp": lp.detach()}), compute_entropy=False,
                           response_rows_only=False)
    model.eval()
    return torch.cat([s["logp"] for s in run_schedule([model], mbs, fn, forward_only=True)])


def _moe_reference_f64(layer, h, idx):
    """float64 MoE layer output [n, H] for input h [n, H] with experts forced to idx [n, K]."""
    h = h.double()
    logits = h @ layer.router.weight.double().t()
    w = torch.softmax(logits.gather(1, idx), dim=-1)  # Qwen3 norm_topk_prob: softmax over the chosen experts
    out = torch.zeros_like(h)
    for e, ex in enumerate(layer.experts.local_experts):
        w1 = ex.linear_fc1.weight.double()  # [2F, H]: gate rows then up rows
        w2 = ex.linear_fc2.weight.double()
        F = w1.shape[0] // 2
        y = (torch.nn.functional.silu(h @ w1[:F].t()) * (h @ w1[F:].t())) @ w2.t()
        coef = (w * (idx == e)).sum(-1, keepdim=True)
        out += coef * y
    return out


def _world(rank):
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from rfpo_megatron.actor import router_replay as rr
    from rfpo_megatron.actor.packing import pack_microbatch
    from rfpo_megatron.actor.parallel import init_parallel

    init_parallel(tp=1, pp=1, seed=1)
    out = {}
    ids = [torch.tensor(p + r) for p, r in SEQS]
    plens = [len(p) for p, _ in SEQS]
    L = [len(x) for x in ids]
    model = _model()
    reps = rr.install([model], replay=False)
    out["layers"] = [r.layer for r in reps]
    # 1) own routing of every token (measure-only pass, no targets)
    mb0 = pack_microbatch(ids, plens, [0, 1, 2], layout="pad")
    lp_own = _logp(model, [mb0])
    T = mb0.input_ids.shape[1]
    own = torch.stack([r.last_own for r in reps], dim=1).reshape(T, 3, LAYERS, K)  # [T, b, L, K]
    # rollout routing in SGLang's layout per sample: [L_i - 1, layers, K], row p = token at position p.
    # start from the model's own choice, re-order some rows (same set: no mismatch) and replace others
    g = torch.Generator().manual_seed(5)
    routed, changed = [], []
    for b in range(3):
        r = own[: L[b] - 1, b].clone()
        ch = torch.zeros(L[b] - 1, LAYERS, dtype=torch.bool)
        for p in range(L[b] - 1):
            for l in range(LAYERS):
                u = float(torch.rand((), generator=g))
                if u < 0.3:
                    r[p, l] = r[p, l].flip(0)
                elif u < 0.75:
                    new = torch.randperm(E, generator=g)[:K]
                    r[p, l] = new
                    ch[p, l] = bool((new.sort().values != own[p, b, l].sort().values).any())
        routed.append(r)
        changed.append(ch)
    # the direct count: changed rows among the response-scoring positions P-1 .. L-2
    out["want_mism"] = sum(int(changed[b][plens[b] - 1:].sum()) for b in range(3))
    out["want_cnt"] = sum((L[b] - plens[b]) * LAYERS for b in range(3))
    # 2) replay off: the metric counts, routing unchanged
    mb = pack_microbatch(ids, plens, [0, 1, 2], layout="pad", routed_experts=routed)
    rr.take_mismatch([model])
    lp_off = _logp(model, [mb])
    out["off"] = rr.take_mismatch([model])
    out["off_equal_own"] = bool(torch.equal(lp_off, lp_own))
    # 3) replay on
    for r in reps:
        r.replay = True
    captured = {}
    hooks = [layer.mlp.register_forward_hook(
        lambda mod, args, res, l=l: captured.__setitem__(l, (args[0].detach().reshape(-1, 32), res[0].detach())))
        for l, layer in enumerate(model.decoder.layers)]
    lp_on = _logp(model, [mb])
    for hk in hooks:
        hk.remove()
    out["on"] = rr.take_mismatch([model])
    # expected experts per token in router order (t * b + bi): the rollout's where given, else the router's
    # own choice in this pass (later layers' inputs follow the replayed earlier layers)
    want = torch.stack([r.last_own for r in reps], dim=1).reshape(T, 3, LAYERS, K)
    for b in range(3):
        want[: L[b] - 1, b] = routed[b]
    want = want.reshape(T * 3, LAYERS, K)
    resp = torch.zeros(T, 3, dtype=torch.bool)
    for b in range(3):
        resp[plens[b] - 1: L[b] - 1, b] = True
    resp = resp.reshape(-1)
    out["used_equal"] = [bool(torch.equal(r.last_used, want[:, l])) for l, r in enumerate(reps)]
    out["resp_rows_equal"] = sum(int((reps[l].last_used[resp] == want[resp, l]).all(-1).sum()) for l in range(LAYERS))
    out["resp_rows"] = int(resp.sum()) * LAYERS
    out["moe_f64_err"] = max(
        float((captured[l][1].double().reshape(-1, 32) - _moe_reference_f64(model.decoder.layers[l].mlp,
                                                                            captured[l][0], want[:, l])).abs().max())
        for l in range(LAYERS))
    out["lp_on_vs_own"] = float((lp_on - lp_own).abs().max())
    # with replay on the later layers' inputs change, so their own top-k is re-derived: float64 router
    # logits of the captured inputs, top-k set vs the rollout's, counted on the response-scoring rows
    has = torch.zeros(T, 3, dtype=torch.bool)
    for b in range(3):
        has[: L[b] - 1, b] = True
    has = has.reshape(-1)
    mism = 0
    for l in range(LAYERS):
        lg = captured[l][0].double() @ model.decoder.layers[l].mlp.router.weight.double().t()
        own64 = lg.topk(K, dim=-1).indices.sort(-1).values
        diff = (own64 != want[:, l].sort(-1).values).any(-1)
        mism += int((diff & resp & has).sum())
    out["want_mism_on"] = mism
    # 4) megatron's own RouterReplay with the full per-token targets
    model2 = _model(replay_flag=True)
    model2.load_state_dict(model.state_dict())
    RouterReplay.set_replay_data([want[:, l] for l in range(LAYERS)])
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    lp_ref = _logp(model2, [mb0])
    RouterReplay.clear_global_router_replay_instances()
    out["lp_on_vs_megatron_replay"] = float((lp_on - lp_ref).abs().max())
    # 5) training forward (forward_only=False) also dispatches to the rollout's experts
    from rfpo_megatron.actor.forward import logprob_output_fn, run_schedule

    model.train()
    fn = logprob_output_fn(lambda mb_, lp, ent: (-lp.sum(), {}), compute_entropy=False, response_rows_only=False)
    run_schedule([model], [mb], fn, forward_only=False)
    out["train_used_equal"] = [bool(torch.equal(r.last_used, want[:, l])) for l, r in enumerate(reps)]
    out["router_grad"] = float(model.decoder.layers[0].mlp.router.weight.grad.abs().sum())
    out["train_count"] = rr.take_mismatch([model])
    # 6) full activation recomputation (PP = 1): the re-run forward routes the same way and counts once
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model3 = _model(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model3.load_state_dict(model.state_dict())
    rr.install([model3], replay=True)
    model3.train()
    run_schedule([model3], [mb], fn, forward_only=False)
    out["recompute_count"] = rr.take_mismatch([model3])
    out["recompute_grad_diff"] = max(float((p.grad - grads[n]).abs().max()) for n, p in model3.named_parameters()
                                     if p.grad is not None)
    out["recompute_grads"] = sum(p.grad is not None for p in model3.parameters())
    out["grads"] = len(grads)
    # 7) the Actor's own path (ActorBatch.routed_experts -> packed micro-batch targets -> metric): the actor's
    # model builder is swapped for this megatron MoE model (the actor builds MoE from HF configs with issue 15's
    # expert-parallel work); everything else is the real Actor
    import rfpo_megatron.actor.actor as actor_mod
    from rfpo_megatron.actor.batch import ActorBatch
    from rfpo_megatron.config import ActorConfig, AlgoConfig

    state = model.state_dict()

    def build(hf_config, **kw):
        from megatron.core.tensor_parallel import set_defaults_if_not_set_tensor_model_parallel_attributes

        from rfpo_megatron.actor.output_rows import enable_response_rows

        m = _model()
        m.load_state_dict(state)
        m.vocab_size_unpadded = 64
        enable_response_rows(m)
        for p in m.parameters():
            set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        return [m]

    actor_mod.build_model = build
    # the HF config of that model (the Actor reads its architecture: MoE layout checks, router-loss set-up)
    hf = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
              num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=E,
              num_experts_per_tok=K, norm_topk_prob=True, router_aux_loss_coef=0.0, max_position_embeddings=32,
              tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0)
    for mode in ("off", "rollout"):
        a = actor_mod.Actor(hf, ActorConfig(router_replay=mode, lr=1e-3, packing="pad", moe_aux_loss_coef=0.0),
                            total_steps=1)
        b = ActorBatch(input_ids=ids, prompt_lens=plens, routed_experts=routed)
        logp, _ = a.compute_logprobs(b)
        out[f"actor_{mode}_logp_count"] = a.last_router_mismatch
        out[f"actor_{mode}_logp"] = torch.cat(logp)
        b.old_logp = logp
        b.advantages = [torch.ones(len(r)) for _, r in SEQS]
        out[f"actor_{mode}_train"] = a.train_step(b, AlgoConfig())["train/router_replay_mismatch"]
    out["lp_off"], out["lp_on"] = lp_off, lp_on
    return out


def test_router_replay_forces_rollout_experts_and_counts_mismatch():
    out = spawn_world(_world, 1, timeout_s=300)[0]
    assert out["layers"] == [0, 1]
    assert 0 < out["want_mism"] < out["want_cnt"]
    # replay off: routing untouched, metric = the direct count
    assert out["off_equal_own"]
    assert out["off"] == (out["want_mism"], out["want_cnt"])
    # replay on: the same metric (own top-k vs rollout) and every token dispatched to the rollout's experts
    # (layer 0 sees the same inputs as without replay; later layers' own choice follows the replayed inputs)
    assert out["on"] == (out["want_mism_on"], out["want_cnt"])
    assert all(out["used_equal"]), out["used_equal"]
    assert out["resp_rows_equal"] == out["resp_rows"]
    assert out["moe_f64_err"] < 1e-5, out["moe_f64_err"]
    assert out["lp_on_vs_megatron_replay"] == 0.0
    assert out["lp_on_vs_own"] > 1e-4  # the replay changed the log-probs (the test can fail)
    assert all(out["train_used_equal"])
    assert out["router_grad"] > 0.0
    assert out["train_count"] == (out["want_mism_on"], out["want_cnt"])
    # full recompute: the same gradients (the re-run forward replays too), the metric counted once
    assert out["recompute_count"] == out["train_count"]
    assert out["recompute_grads"] == out["grads"] > 0
    assert out["recompute_grad_diff"] <= 1e-6, out["recompute_grad_diff"]
    # the Actor: replay off scores with its own routing, on with the rollout's; the metric in both modes
    assert out["actor_off_logp_count"] == (out["want_mism"], out["want_cnt"])
    assert out["actor_rollout_logp_count"] == (out["want_mism_on"], out["want_cnt"])
    assert (out["actor_off_logp"] - out["lp_off"]).abs().max() <= 1e-5
    assert (out["actor_rollout_logp"] - out["lp_on"]).abs().max() <= 1e-5
    assert out["actor_off_train"] == out["want_mism"] / out["want_cnt"]
    assert out["actor_rollout_train"] == out["want_mism_on"] / out["want_cnt"]


def test_thd_targets_follow_the_packed_positions():
    """Hand-built: thd packs sample rows back to back (b = 1); pad puts token (bi, t) at row t * b + bi."""
    from rfpo_megatron.actor.router_replay import microbatch_targets

    r0 = torch.arange(3 * 1 * 2).reshape(3, 1, 2)  # L=4: rows for positions 0..2
    r1 = 100 + torch.arange(1 * 1 * 2).reshape(1, 1, 2)  # L=2: position 0
    tgt, cnt = microbatch_targets([r0, r1], [4, 2], [2, 1], layout="thd", seq_len=6)
    assert tgt[:, 0].tolist() == [[0, 1], [2, 3], [4, 5], [-1, -1], [100, 101], [-1, -1]]
    assert cnt.tolist() == [False, True, True, False, True, False]
    tgt, cnt = microbatch_targets([r0, None], [4, 2], [2, 1], layout="pad", seq_len=4)
    assert tgt[:, 0].tolist() == [[0, 1], [-1, -1], [2, 3], [-1, -1], [4, 5], [-1, -1], [-1, -1], [-1, -1]]
    assert cnt.tolist() == [False, True, True, False, True, False, False, False]


def test_trainer_batch_carries_rollout_routing_to_the_actor_batch():
    """Sample.routed_experts -> StepBatch -> the log-prob pass's ActorBatch; a fix (routed under the fix prompt)
    and the fixed rows' originals carry none; a routing of the wrong length is refused naming the field."""
    import pytest

    from rfpo_megatron.actor.batch import ActorBatch
    from rfpo_megatron.data.types import RolloutGroup, Sample
    from rfpo_megatron.train.batch import build_batch, logprob_pass

    r0 = torch.arange(5 * 2 * 2, dtype=torch.int32).reshape(5, 2, 2)  # P=3, T=3: 5 rows
    s0 = Sample(prompt_ids=[1, 2, 3], response_ids=[4, 5, 6], routed_experts=r0)
    s1 = Sample(prompt_ids=[1, 2, 3], response_ids=[7, 8], is_fixed=True, fixed_from=[9], use_tis=False,
                routed_experts=torch.zeros(4, 2, 2, dtype=torch.int32))
    b = build_batch([RolloutGroup(prompt_ids=[1, 2, 3], samples=[s0, s1])])
    assert b.routed_experts[0] is r0 and b.routed_experts[1] is None

    class Recorder:  # records the ActorBatch of the pass (no model needed for the plumbing)
        def compute_logprobs(self, batch):
            self.batch = batch
            return [torch.zeros(r) for r in batch.response_lens], None

    rec = Recorder()
    logprob_pass(rec, b, originals=True)
    got = rec.batch.routed_experts
    assert len(got) == 3 and torch.equal(got[0], r0) and got[1] is None and got[2] is None
    with pytest.raises(ValueError, match=r"routed_experts\[0\] has shape \(6, 2, 2\)"):
        ActorBatch.from_prompt_response([[1, 2, 3]], [[4, 5, 6]], routed_experts=[torch.zeros(6, 2, 2)])
