"""MoE memory in the planner: a hand-computed example, the Qwen3-30B-A3B preset, and megatron's real DDP buffers.

Hand example (``SMALL``): vocab 1000, h = 64, 2 layers (both MoE), 4 q / 2 kv heads of 16, E = 8 experts, top-2,
F_moe = 32; TP = PP = 1, DP = 4, EP = 2 (ETP = 1, so EDP = 4 / 2 = 2); bf16 params, fp32 grads, distributed Adam;
1024 tokens per micro-batch, no recompute, flash attention, aux loss on.

* experts on a rank: 2 layers x 8/2 experts x (fc1 2*32*64 + fc2 64*32 = 6144) = 49152 elements (every param a
  multiple of 64, the buffer a multiple of lcm(2, 128) = 128: no padding)
  -> weights 2 B x 49152 = 98304; grads 4 B x 49152 = 196608; Adam 12 B x 49152 / 2 = 294912.
* MoE layer activations per token: attention 8h + 2(nq + 2nkv)d + 2 nq d + 4 nq = 512 + 256 + 128 + 16 = 912;
  router 4E + E + 4E = 72; 2 routed copies x (4h + 8 + 6F) = 2 x (256 + 8 + 192) = 912 -> 1896 B/token/layer;
  x 2 layers x 1024 tokens x 1 micro-batch in flight = 3883008, + the embedding output 2h x 1024 = 131072
  -> 4014080. Router part: 2 x 72 x 1024 = 147456.
* dispatcher (one layer, transient): send + receive 2 x 2hk = 512 B/token x 1024 = 524288.
"""
from __future__ import annotations

import pytest

from rfpo_megatron import plan as P
from rfpo_megatron.actor.launch import spawn_world

SMALL = dict(model_type="qwen3_moe", vocab_size=1000, hidden_size=64, intermediate_size=128,
             moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
             max_position_embeddings=2048)


def _settings(**kw):
    base = dict(tokens_per_microbatch=1024, seq_len=1024, recompute="none", param_dtype="bf16", grad_fp32=True,
                use_distributed_optimizer=True, flash_attention=True, moe_aux_loss=True)
    base.update(kw)
    return P.TrainSettings(**base)


def test_small_moe_by_hand():
    m = P.shape_from_hf(SMALL, name="small")
    assert (m.num_experts, m.moe_topk, m.moe_ffn_hidden_size, m.moe_layers) == (8, 2, 32, (0, 1))
    p = P.plan_memory(m, P.Layout(tp=1, pp=1, dp=4, ep=2, etp=1, sglang_tp=1), _settings())
    assert p.layout.edp == 2
    assert (p.expert_weights, p.expert_grads, p.expert_optimizer) == (98304, 196608, 294912)
    assert p.activations == 4014080
    assert p.router_logits == 147456
    assert p.dispatcher == 524288
    # the dense part is the planner's dense rule: the same model's totals minus the experts equal a plan whose
    # MLPs are the routers alone (EP does not change them)
    dense = P.rank_state_bytes(m, 1, 1, 0, 4, _settings())
    assert p.weights - p.expert_weights == dense.weights - dense.expert_weights
    assert p.train_peak == (p.weights + p.grads + p.optimizer_gpu + p.activations + p.logits + p.overhead
                            + p.dispatcher)
    table = P.format_plan(p)
    assert "EP=2 ETP=1 EDP=2" in table and "MoE dispatcher" in table


def test_small_moe_layouts_shard_as_megatron_does():
    m = P.shape_from_hf(SMALL, name="small")
    s = _settings()
    ep1 = P.rank_state_bytes(m, 1, 1, 0, 4, s, ep=1, etp=1)
    ep2 = P.rank_state_bytes(m, 1, 1, 0, 4, s, ep=2, etp=1)
    assert ep1.expert_params == 2 * ep2.expert_params == 2 * 49152
    # EP=1: EDP = 4 -> the same Adam bytes per rank as EP=2, EDP=2 (half the experts, twice the shard)
    assert ep1.expert_optimizer == ep2.expert_optimizer == 294912
    # expert TP = 2 at TP = 2: fc1/fc2 split in two, EDP = 2*2 / (2*2) = 1
    tp2 = P.rank_state_bytes(m, 2, 1, 0, 2, s, ep=2, etp=2)
    assert tp2.expert_params == 49152 // 2 and tp2.expert_optimizer == 12 * (49152 // 2)
    with pytest.raises(P.PlanError, match="expert_model_parallel_size=3"):
        P.rank_state_bytes(m, 1, 1, 0, 3, s, ep=3)
    with pytest.raises(P.PlanError, match="sequence_parallel"):
        P.plan_memory(m, P.Layout(tp=2, dp=2, ep=2, sequence_parallel=False), s)
    with pytest.raises(P.PlanError, match="dense"):
        P.plan_memory(P.shape_from_hf("qwen3-32b"), P.Layout(tp=8, ep=2), s)


def test_qwen3_30b_a3b_preset():
    m = P.shape_from_hf("qwen3-30b-a3b")
    assert abs(P.total_params(m) - 30.53e9) < 0.01e9  # the model card's 30.5B
    # active params per token: attention + embedding/head + 8 of 128 experts per layer = the card's 3.3B
    experts = sum(n for _, n, _ in P.stage_expert_params(m, 1, 0))
    active = P.total_params(m) - experts + experts * 8 // 128
    assert abs(active - 3.35e9) < 0.05e9, active


def _world(rank):
    """Real megatron DDP buffers (dense + expert-parallel) of a GPTModel with MoE layers on 2 gloo ranks:
    EP = 1 (DP = 2: the experts stay in the dense buffer; distributed optimizer on and off), then EP = 2
    (a separate expert-parallel buffer with EDP = 1 next to the dense one with DP = 2)."""
    import datetime

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from rfpo_megatron.actor.compat import enable_cpu_compat

    import test_router_replay as R

    enable_cpu_compat()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    out = {}
    for ep, dist_opts in ((1, (True, False)), (2, (True,))):
        mpu.initialize_model_parallel(expert_model_parallel_size=ep)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        for dist_opt in dist_opts:
            torch.manual_seed(0)
            cfg = R._model().config
            cfg.expert_model_parallel_size = ep
            model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(
                num_experts=R.E, moe_grouped_gemm=False, qk_layernorm=True), vocab_size=64, max_sequence_length=32,
                position_embedding_type="rope")
            ddp = DistributedDataParallel(config=cfg, module=model, ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt, overlap_grad_reduce=False))
            out[(ep, dist_opt)] = dict(names={n: p.numel() for n, p in model.named_parameters()},
                                       dense=[b.numel for b in ddp.buffers],
                                       expert=[b.numel for b in ddp.expert_parallel_buffers])
        dist.barrier()
        mpu.destroy_model_parallel()
    return out


def test_planner_equals_real_megatron_moe_buffers():
    import test_router_replay as R

    out = spawn_world(_world, 2, timeout_s=300)
    m = P.ModelShape("t", 64, 32, 64, R.LAYERS, 4, 2, 8, False, False, True, num_experts=R.E, moe_topk=R.K,
                     moe_ffn_hidden_size=16, moe_layers=tuple(range(R.LAYERS)))
    for (ep, dist_opt) in out[0]:
        names = dict((n, k) for n, k, _ in P.stage_params(m, 1, 1, 0, vocab_multiple=64))
        names.update((n, k) for n, k, _ in P.stage_expert_params(m, 1, 0, ep=ep))
        st = P.rank_state_bytes(m, 1, 1, 0, 2, _settings(param_dtype="fp32", use_distributed_optimizer=dist_opt),
                                vocab_multiple=64, ep=ep, etp=1)
        for o in out:
            got = o[(ep, dist_opt)]
            assert names == got["names"], (ep, dist_opt)
            assert [b.numel for b in st.buffers] == got["dense"] + got["expert"], (ep, dist_opt)
            assert len(got["expert"]) == (1 if ep > 1 else 0)
    assert P.rank_state_bytes(m, 1, 1, 0, 2, _settings(), ep=2, etp=1).expert_params == \
        R.LAYERS * (R.E // 2) * 3 * 32 * 16
