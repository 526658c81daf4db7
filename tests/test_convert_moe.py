"""Qwen3-MoE conversion: transformers' Qwen3MoeForCausalLM (tiny, random weights) vs the megatron actor at
TP 1, EP 2, PP 2 (one 2-rank world; TP 2 x EP 2 in a 4-rank one, slow), plus HF -> megatron -> HF round trips
tensor by tensor.

The tiny model has 4 layers, layer 1 dense (``mlp_only_layers``), the others MoE with 4 experts, top-2.
Reference logits are transformers' own forward in float32; the round trip compares the HF safetensors that
`save_hf` writes (the rollout weight-sync names, `iter_hf_weights`) with transformers' own save_pretrained.
"""
from __future__ import annotations

import os

import pytest
import torch

from rfpo_megatron.actor.launch import spawn_world
from tiny_hf import MOE_HF as HF, make_tiny_moe


def hf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _ids():
    return torch.randint(0, HF["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))


def _hf_tensors(path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _layout(hf_dir, out_root, tp, pp, ep, etp, sp):
    from transformers import AutoConfig

    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.config import ActorConfig
    from rfpo_megatron.convert.export import save_hf
    from rfpo_megatron.convert.hf_load import load_hf_into_model
    from rfpo_megatron.convert.mapping import mcore_to_hf_state
    from rfpo_megatron.convert.arch import arch_from_hf_config
    from rfpo_megatron.convert.sharding import gather_full_state

    init_parallel(tp=tp, pp=pp, ep=ep, etp=etp, seed=5)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    cfg = ActorConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                      expert_tensor_parallel_size=etp, sequence_parallel=sp)
    actor = Actor(hf_config, cfg, with_optimizer=False)
    load_hf_into_model(actor.modules, hf_dir)
    out_dir = os.path.join(out_root, f"tp{tp}pp{pp}ep{ep}etp{etp}")
    save_hf(actor.modules, hf_config, out_dir)
    # the canonical full state of this stage -> HF names (what the offline tools convert)
    stage = mcore_to_hf_state(arch_from_hf_config(hf_config),
                              gather_full_state(actor.modules, vocab_size=hf_config.vocab_size))
    return {"logits": actor.forward_logits(_ids()), "out_dir": out_dir, "stage_hf": stage,
            "local_experts": sorted({n.split("local_experts.")[1].split(".")[0]
                                     for n, _ in actor.modules[0].named_parameters() if "local_experts" in n})}


def _world(rank, hf_dir, out_root, layouts):
    """Each (tp, pp, ep, etp, sp) layout in turn in the same processes (one megatron import per world)."""
    from rfpo_megatron.actor.parallel import destroy_parallel

    out = []
    for layout in layouts:
        out.append(_layout(hf_dir, out_root, *layout))
        destroy_parallel(keep_process_group=True)
    return out


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    path = make_tiny_moe(root / "hf")
    return {"path": path, "root": str(root), "logits": hf_logits(path, _ids()), "tensors": _hf_tensors(path)}


def _check_world(moe_dir, outs, tol=1e-5):
    for o in outs:
        diff = (o["logits"] - moe_dir["logits"]).abs().max().item()
        print(f"{o['out_dir'].rsplit('/', 1)[-1]}: max |logits - HF| = {diff:.2e}")
        assert diff <= tol, diff
    ref = moe_dir["tensors"]
    got = _hf_tensors(outs[0]["out_dir"])
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():
        assert torch.equal(got[name], t), name
    merged = {}
    for o in outs:
        merged.update(o["stage_hf"])
    assert sorted(merged) == sorted(ref)
    assert all(torch.equal(merged[n], ref[n]) for n in ref)


def test_arch_reads_qwen3_moe_and_refuses_what_megatron_cannot_express():
    from rfpo_megatron.convert.arch import ConversionError, arch_from_hf_config

    a = arch_from_hf_config(HF)
    assert (a.num_experts, a.moe_topk, a.moe_ffn_hidden_size, a.norm_topk_prob, a.moe_layers) == (4, 2, 32, True, (0, 2, 3))
    assert a.qk_norm and a.router_aux_loss_coef == 0.01
    # transformers 5 writes num_local_experts into config.json; Qwen's own files say num_experts
    assert arch_from_hf_config({**{k: v for k, v in HF.items() if k != "num_experts"}, "num_local_experts": 4}) == a
    assert arch_from_hf_config({**HF, "decoder_sparse_step": 2, "mlp_only_layers": []}).moe_layers == (1, 3)
    # decoder_sparse_step absent = Qwen3MoeConfig's default 1 (the transformers class says so)
    from transformers import Qwen3MoeConfig

    assert Qwen3MoeConfig().decoder_sparse_step == 1
    assert arch_from_hf_config({k: v for k, v in HF.items() if k != "decoder_sparse_step"}) == a
    for bad, field in (({"num_experts_per_tok": 5}, "num_experts_per_tok"),
                       ({"moe_intermediate_size": None}, "moe_intermediate_size"),
                       ({"mlp_only_layers": [7]}, "mlp_only_layers"),
                       ({"mlp_only_layers": [0, 1, 2, 3]}, "decoder_sparse_step"),
                       ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size"),
                       ({"router_jitter_noise": 0.1}, "router_jitter_noise")):
        with pytest.raises(ConversionError, match=field):
            arch_from_hf_config({**HF, **bad})
    with pytest.raises(ConversionError, match="num_experts"):
        arch_from_hf_config({**HF, "model_type": "qwen3"})  # experts on a dense family stay refused


def test_mapping_names_and_mismatch_names_the_tensor(moe_dir):
    from rfpo_megatron.convert.arch import ConversionError, arch_from_hf_config
    from rfpo_megatron.convert.mapping import all_rules, check_hf_tensors

    arch = arch_from_hf_config(HF)
    ref = moe_dir["tensors"]
    hf_names = {n for r in all_rules(arch) for n in r.hf}
    assert hf_names == set(ref)  # every checkpoint tensor has exactly one rule
    shapes = {n: tuple(t.shape) for n, t in ref.items()}
    check_hf_tensors(arch, shapes)
    bad = dict(shapes, **{"model.layers.2.mlp.experts.3.up_proj.weight": (16, 64)})
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight.*moe_intermediate_size=32"):
        check_hf_tensors(arch, bad)
    missing = {n: s for n, s in shapes.items() if n != "model.layers.0.mlp.gate.weight"}
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.gate\.weight"):
        check_hf_tensors(arch, missing)


LAYOUTS_2 = {"tp1": (1, 1, 1, None, False), "ep2": (1, 1, 2, None, False), "pp2": (1, 2, 1, None, False)}


@pytest.fixture(scope="module")
def world2(moe_dir):
    per_rank = spawn_world(_world, 2, moe_dir["path"], moe_dir["root"], list(LAYOUTS_2.values()), timeout_s=500)
    return {name: [r[i] for r in per_rank] for i, name in enumerate(LAYOUTS_2)}


def test_tp1_logits_and_round_trip(moe_dir, world2):
    _check_world(moe_dir, world2["tp1"])  # TP = 1 (x DP = 2)


def test_ep2_logits_and_round_trip(moe_dir, world2):
    outs = world2["ep2"]
    assert [o["local_experts"] for o in outs] == [["0", "1"], ["0", "1"]]  # 2 local experts per EP rank
    _check_world(moe_dir, outs)


def test_pp2_logits_and_round_trip(moe_dir, world2):
    _check_world(moe_dir, world2["pp2"])


@pytest.mark.slow
def test_tp2_ep2_logits_and_round_trip(moe_dir):
    # expert TP = TP = 2 (megatron's default), then expert TP = 1 (experts whole, EP over TP ranks); sequence
    # parallel (megatron requires it with TP and EP)
    outs = spawn_world(_world, 4, moe_dir["path"], moe_dir["root"], [(2, 1, 2, None, True), (2, 1, 2, 1, True)],
                       timeout_s=600)
    _check_world(moe_dir, [o[0] for o in outs])
    _check_world(moe_dir, [o[1] for o in outs])


@pytest.mark.parametrize("fmt", ["actor", "sharded"])
def test_offline_tools_round_trip_tp2_pp2(moe_dir, tmp_path, fmt):
    from rfpo_megatron.offline.tools import hf_to_mcore, mcore_to_hf

    hf_to_mcore(moe_dir["path"], tmp_path / "mcore", tp=2, pp=2, fmt=fmt, progress=False)  # experts split by TP
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", progress=False)
    got, ref = _hf_tensors(tmp_path / "back"), moe_dir["tensors"]
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
