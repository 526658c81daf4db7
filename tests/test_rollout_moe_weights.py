"""Weight sync of a Qwen3-MoE actor into the embedded engine (per-expert names -> transformers' fused experts).

The megatron actor (tiny Qwen3-MoE, perturbed after loading) streams `iter_hf_weights` buckets small enough
to split a layer's experts; the engine, an HF `Qwen3MoeForCausalLM` whose experts are fused
([E, 2I, H] gate_up_proj, [E, H, I] down_proj), must end up with exactly the model transformers' own loader
builds (its conversion mapping) from the same weights saved by `save_hf`: equal state, equal logits. The disk
path (`update_weights_from_disk` of that directory) must give the same, and the megatron forward agrees.
"""
from __future__ import annotations

import pytest
import torch

from rfpo_megatron.actor.launch import spawn_world
from tiny_hf import MOE_HF, make_tiny_moe


def _ids():
    return torch.randint(0, MOE_HF["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(7))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _world(rank, hf_dir, out_dir):
    from transformers import AutoConfig, Qwen3MoeForCausalLM

    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.config import ActorConfig
    from rfpo_megatron.convert.export import iter_hf_weights, save_hf
    from rfpo_megatron.convert.hf_load import load_hf_into_model
    from rfpo_megatron.rollout import weights as W
    from rfpo_megatron.rollout.embedded import EmbeddedEngine, RequestError

    init_parallel(tp=1, pp=1, ep=1, seed=3)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    actor = Actor(hf_config, ActorConfig(), with_optimizer=False)
    load_hf_into_model(actor.modules, hf_dir)
    engine = EmbeddedEngine(hf_dir)
    ids = _ids()
    before = _logits(engine.model, ids)
    torch.manual_seed(11)
    with torch.no_grad():
        for p in actor.modules[0].parameters():
            p.add_(0.05 * torch.randn_like(p))

    # buckets of ~5 expert matrices (32x64 fp32 = 8 KiB each): a layer's 12 expert tensors span buckets
    buckets = [[(n, t.clone()) for n, t in b] for b in iter_hf_weights(actor.modules, hf_config, bucket_bytes=40_000)]
    loaded = 0
    for b in buckets:
        engine.begin_weight_update()
        loaded += engine.update_weights_from_tensor([W.encode_safetensors_b64(b)], W.SAFETENSORS_B64)
        engine.end_weight_update()
    after = _logits(engine.model, ids)

    save_hf(actor.modules, hf_config, out_dir)
    ref_model = Qwen3MoeForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ref = _logits(ref_model, ids)
    disk = EmbeddedEngine(hf_dir)
    disk_count = disk.update_weights_from_disk(out_dir)

    name = "model.layers.0.mlp.experts.2.up_proj.weight"
    errors = {}
    for bad in ([(name, torch.zeros(3, 64))], [("model.layers.0.mlp.experts.4.up_proj.weight", torch.zeros(32, 64))]):
        try:
            engine.load_named_tensors(bad)
        except RequestError as e:
            errors[bad[0][0]] = str(e)
    return {
        "buckets": [[n for n, _ in b] for b in buckets], "loaded": loaded, "disk_count": disk_count,
        "before": before, "after": after, "ref": ref, "disk": _logits(disk.model, ids),
        "megatron": actor.forward_logits(ids).float(),
        "engine_state": {k: v.detach().clone() for k, v in engine.model.state_dict().items()},
        "disk_state": {k: v.detach().clone() for k, v in disk.model.state_dict().items()},
        "ref_state": {k: v.detach().clone() for k, v in ref_model.state_dict().items()},
        "up_sent": dict(sum(buckets, []))[name], "errors": errors,
    }


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    hf_dir = make_tiny_moe(tmp_path_factory.mktemp("moe_hf"))
    return spawn_world(_world, 1, hf_dir, str(tmp_path_factory.mktemp("moe_out")), timeout_s=400)[0]


def test_buckets_split_a_layers_experts(synced):
    per_layer = {}
    for i, names in enumerate(synced["buckets"]):
        for n in names:
            if ".mlp.experts." in n:
                per_layer.setdefault(n.split(".mlp.")[0], set()).add(i)
    assert any(len(b) > 1 for b in per_layer.values()), "the test needs buckets holding part of a layer's experts"
    n_expert = sum(".mlp.experts." in n for b in synced["buckets"] for n in b)
    assert n_expert == 3 * 3 * MOE_HF["num_experts"]  # 3 MoE layers (layer 1 dense) x 4 experts x gate/up/down
    assert synced["loaded"] == sum(len(b) for b in synced["buckets"])


def test_engine_equals_transformers_loading_of_the_saved_weights(synced):
    es, rs = synced["engine_state"], synced["ref_state"]
    assert es.keys() == rs.keys() and "model.layers.0.mlp.experts.gate_up_proj" in es
    diff = {k: (es[k] - rs[k]).abs().max().item() for k in rs}
    print("max state diff", max(diff.values()))
    assert all(d == 0.0 for d in diff.values()), {k: d for k, d in diff.items() if d}
    # the per-expert tensor sits where transformers' forward reads it: up = rows [I, 2I) of expert 2
    i = MOE_HF["moe_intermediate_size"]
    assert torch.equal(es["model.layers.0.mlp.experts.gate_up_proj"][2, i:], synced["up_sent"])
    d_ref = (synced["after"] - synced["ref"]).abs().max().item()
    d_moved = (synced["after"] - synced["before"]).abs().max().item()
    d_meg = (synced["megatron"] - synced["ref"]).abs().max().item()
    print(f"engine vs HF {d_ref:.2e}, engine moved {d_moved:.3f}, megatron vs HF {d_meg:.2e}")
    assert d_ref == 0.0
    assert d_moved > 0.05  # the perturbation really arrived
    assert d_meg < 1e-4


def test_update_from_disk_of_exported_dir(synced):
    ds, rs = synced["disk_state"], synced["ref_state"]
    assert all(torch.equal(ds[k], rs[k]) for k in rs)
    assert torch.equal(synced["disk"], synced["ref"])
    assert synced["disk_count"] == len(sum(synced["buckets"], []))


def test_bad_expert_shape_and_index_are_named(synced):
    errs = synced["errors"]
    assert "shape mismatch" in errs["model.layers.0.mlp.experts.2.up_proj.weight"]
    assert "(32, 64)" in errs["model.layers.0.mlp.experts.2.up_proj.weight"]
    assert "unknown weight names" in errs["model.layers.0.mlp.experts.4.up_proj.weight"]
