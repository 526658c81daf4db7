"""The pure conversion rules against hand-worked cases and independent loop/float64 references.

Covers megatron's GQA group interleave of linear_qkv, the SwiGLU gate/up layout per TP rank, row/column
splits, vocab padding, the per-family name tables, and config validation that names the field.
"""
from __future__ import annotations

import pytest
import torch

from rfpo_megatron.convert.arch import ConversionError, arch_from_hf_config, padded_vocab
from rfpo_megatron.convert.mapping import (
    all_rules,
    check_hf_tensors,
    fuse_qkv,
    hf_to_mcore_state,
    mcore_to_hf_state,
    split_qkv,
)
from rfpo_megatron.convert.sharding import TE_TO_LOCAL, merge_tp, shard_tp, split_tp, to_canonical, tp_kind


def _cfg(model_type="qwen2", **kw):
    base = dict(model_type=model_type, vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0)
    base.update(kw)
    return base


# ---- QKV group interleave ------------------------------------------------------------------------


def _qkv_reference_loops(q, k, v, nq, ng, d):
    """Row-by-row: for each KV group g, its nq/ng query heads, then k head g, then v head g."""
    rows = []
    per = nq // ng
    for g in range(ng):
        for j in range(per):
            head = g * per + j
            rows += [q[head * d + r] for r in range(d)]
        rows += [k[g * d + r] for r in range(d)]
        rows += [v[g * d + r] for r in range(d)]
    return torch.stack(rows)


def test_fuse_qkv_hand_worked():
    # nq=2, ng=1, d=1, h=1: q1 q2 k1 v1
    q, k, v = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0]]), torch.tensor([[4.0]])
    assert fuse_qkv(q, k, v, 2, 1).flatten().tolist() == [1, 2, 3, 4]
    # nq=4, ng=2, d=1 (bias-shaped): q1 q2 k1 v1 | q3 q4 k2 v2
    qb, kb, vb = torch.tensor([1.0, 2, 3, 4]), torch.tensor([5.0, 6]), torch.tensor([7.0, 8])
    assert fuse_qkv(qb, kb, vb, 4, 2).tolist() == [1, 2, 5, 7, 3, 4, 6, 8]


@pytest.mark.parametrize("nq,ng,d,h", [(4, 2, 3, 5), (8, 1, 2, 4), (6, 6, 2, 3), (12, 4, 5, 7)])
def test_fuse_split_qkv_against_loops(nq, ng, d, h):
    g = torch.Generator().manual_seed(nq * 100 + ng)
    q, k, v = torch.randn(nq * d, h, generator=g), torch.randn(ng * d, h, generator=g), torch.randn(ng * d, h, generator=g)
    fused = fuse_qkv(q, k, v, nq, ng)
    assert torch.equal(fused, _qkv_reference_loops(q, k, v, nq, ng, d))
    q2, k2, v2 = split_qkv(fused, nq, ng, d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    # bias
    qb, kb, vb = q[:, 0].contiguous(), k[:, 0].contiguous(), v[:, 0].contiguous()
    assert torch.equal(fuse_qkv(qb, kb, vb, nq, ng), _qkv_reference_loops(qb, kb, vb, nq, ng, d))


@pytest.mark.parametrize("nq,ng,tp", [(4, 2, 2), (8, 4, 2), (8, 4, 4)])
def test_qkv_tp_shard_holds_its_heads(nq, ng, tp):
    """A TP rank's contiguous slice of linear_qkv holds exactly query heads [r·nq/tp, …) and KV groups [r·ng/tp, …)."""
    d, h = 2, 3
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(nq * d, h, generator=g), torch.randn(ng * d, h, generator=g), torch.randn(ng * d, h, generator=g)
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    for r, shard in enumerate(split_tp(name, fuse_qkv(q, k, v, nq, ng), tp)):
        qr, kr, vr = split_qkv(shard, nq // tp, ng // tp, d)
        assert torch.equal(qr, q[r * nq // tp * d:(r + 1) * nq // tp * d])
        assert torch.equal(kr, k[r * ng // tp * d:(r + 1) * ng // tp * d])
        assert torch.equal(vr, v[r * ng // tp * d:(r + 1) * ng // tp * d])


# ---- TP split / merge ------------------------------------------------------------------------------


def test_glu_shards_hand_worked():
    gate = torch.tensor([[0.0], [1], [2], [3]])
    up = torch.tensor([[10.0], [11], [12], [13]])
    name = "decoder.layers.3.mlp.linear_fc1.weight"
    shards = split_tp(name, torch.cat([gate, up]), 2)
    assert shards[0].flatten().tolist() == [0, 1, 10, 11]
    assert shards[1].flatten().tolist() == [2, 3, 12, 13]
    assert torch.equal(merge_tp(name, shards), torch.cat([gate, up]))


def test_tp_sharded_mlp_equals_full_mlp_float64():
    """Σ_r fc2_r(silu(gate_r x) · up_r x) over TP shards == down(silu(gate x) · up x), written with loops."""
    h, F, tp = 5, 8, 4
    g = torch.Generator().manual_seed(11)
    gate, up, down = (torch.randn(F, h, generator=g, dtype=torch.float64), torch.randn(F, h, generator=g, dtype=torch.float64),
                      torch.randn(h, F, generator=g, dtype=torch.float64))
    x = torch.randn(h, generator=g, dtype=torch.float64)
    ref = []
    for o in range(h):
        acc = 0.0
        for f in range(F):
            a = sum(gate[f, i].item() * x[i].item() for i in range(h))
            b = sum(up[f, i].item() * x[i].item() for i in range(h))
            acc += down[o, f].item() * (a / (1 + torch.exp(torch.tensor(-a)).item())) * b
        ref.append(acc)
    fc1 = split_tp("decoder.layers.0.mlp.linear_fc1.weight", torch.cat([gate, up]), tp)
    fc2 = split_tp("decoder.layers.0.mlp.linear_fc2.weight", down, tp)
    out = torch.zeros(h, dtype=torch.float64)
    for r in range(tp):
        gu = fc1[r] @ x
        a, b = gu.chunk(2)
        out += fc2[r] @ (torch.nn.functional.silu(a) * b)
    assert torch.allclose(out, torch.tensor(ref, dtype=torch.float64), atol=1e-12)


def test_row_col_replicated_and_vocab_padding():
    w = torch.arange(12.0).reshape(3, 4)
    row = "decoder.layers.0.self_attention.linear_proj.weight"
    assert [s.tolist() for s in split_tp(row, w, 2)] == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [10, 11]]]
    assert torch.equal(merge_tp(row, split_tp(row, w, 2)), w)
    norm = "decoder.layers.0.input_layernorm.weight"
    assert all(torch.equal(s, w) for s in split_tp(norm, w, 3))
    emb = torch.arange(10.0).reshape(5, 2)
    shards = split_tp("embedding.word_embeddings.weight", emb, 2, padded_vocab=8)
    assert shards[0].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert shards[1].tolist() == [[8, 9], [0, 0], [0, 0], [0, 0]]
    assert torch.equal(merge_tp("embedding.word_embeddings.weight", shards, vocab_size=5), emb)
    assert merge_tp("output_layer.weight", shards).shape == (8, 2)
    with pytest.raises(ConversionError, match="not divisible by TP=2"):
        shard_tp(row, torch.zeros(2, 3), 2, 0)
    with pytest.raises(ConversionError, match="rows but the model holds 4"):
        shard_tp("output_layer.weight", emb, 1, 0, padded_vocab=4)


def test_tp_kinds_and_te_names():
    assert tp_kind("decoder.layers.1.self_attention.linear_qkv.bias") == "col"
    assert tp_kind("decoder.layers.1.self_attention.linear_proj.bias") == "rep"
    assert tp_kind("decoder.layers.1.mlp.linear_fc2.bias") == "rep"
    assert tp_kind("decoder.layers.1.mlp.linear_fc1.layer_norm_weight") == "rep"
    assert tp_kind("decoder.layers.1.self_attention.q_layernorm.weight") == "rep"
    # local → global renumbering and TE → local names
    assert to_canonical("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", [4, 5]) == "decoder.layers.5.pre_mlp_layernorm.weight"
    assert to_canonical("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", [6]) == "decoder.layers.6.input_layernorm.weight"
    assert to_canonical("output_layer.weight", []) == "output_layer.weight"
    assert set(TE_TO_LOCAL.values()) >= {"input_layernorm.weight", "pre_mlp_layernorm.weight"}


def test_padded_vocab():
    from rfpo_megatron.actor.model import padded_vocab_size

    for v, tp, want in [(300, 1, 384), (300, 2, 512), (256, 2, 256), (151936, 1, 151936), (151936, 2, 152064), (128256, 8, 129024)]:
        assert padded_vocab(v, tp) == want == padded_vocab_size(v, tp)


# ---- family name tables ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,extra,n_layer_tensors", [
    ("qwen2", {}, 12),  # input_ln, q/k/v w+b, o, post_ln, gate, up, down
    ("llama", {}, 9),
    ("llama", {"attention_bias": True, "mlp_bias": True}, 16),
    ("qwen3", {"head_dim": 24}, 11),
])
def test_family_tables_roundtrip(model_type, extra, n_layer_tensors):
    arch = arch_from_hf_config(_cfg(model_type, **extra))
    rules = all_rules(arch)
    hf_names = [n for r in rules for n in r.hf]
    assert len(hf_names) == len(set(hf_names))
    assert sum(n.startswith("model.layers.0.") for n in hf_names) == n_layer_tensors
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g) for r in rules for n, s in zip(r.hf, r.hf_shapes)}
    check_hf_tensors(arch, {n: tuple(t.shape) for n, t in hf.items()})
    mc = dict(hf_to_mcore_state(arch, hf.__getitem__, rules))
    assert mc["decoder.layers.1.self_attention.linear_qkv.weight"].shape == (arch.qkv_rows, 64)
    back = mcore_to_hf_state(arch, mc)
    assert set(back) == set(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


def test_qwen3_q_k_norm_names_and_head_dim():
    arch = arch_from_hf_config(_cfg("qwen3", head_dim=24))
    names = {r.mcore: r for r in all_rules(arch)}
    assert names["decoder.layers.0.self_attention.q_layernorm.weight"].hf == ("model.layers.0.self_attn.q_norm.weight",)
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"].mcore_shape == ((4 + 2 * 2) * 24, 64)
    assert names["decoder.layers.0.self_attention.linear_proj.weight"].mcore_shape == (64, 96)


def test_tied_has_no_head_and_accepts_equal_lm_head():
    arch = arch_from_hf_config(_cfg("llama", tie_word_embeddings=True))
    assert "output_layer.weight" not in {r.mcore for r in all_rules(arch)}
    shapes = {n: s for r in all_rules(arch) for n, s in zip(r.hf, r.hf_shapes)}
    check_hf_tensors(arch, {**shapes, "lm_head.weight": (300, 64)})  # tied checkpoints may carry it
    # the last PP stage's duplicate head is not exported
    assert mcore_to_hf_state(arch, {"output_layer.weight": torch.zeros(300, 64)}) == {}


# ---- validation names the field / tensor -----------------------------------------------------------


@pytest.mark.parametrize("cfg,pattern", [
    (_cfg("mistral"), "model_type"),
    (_cfg(num_key_value_heads=3), "num_key_value_heads"),
    (_cfg(hidden_size=None), "hidden_size"),
    (_cfg(num_hidden_layers=0), "num_hidden_layers"),
    (_cfg(hidden_act="gelu"), "hidden_act"),
    (_cfg("llama", attention_bias=True), "attention_bias"),
    (_cfg(hidden_size=66), "head_dim"),
])
def test_bad_configs_name_the_field(cfg, pattern):
    with pytest.raises(ConversionError, match=pattern):
        arch_from_hf_config(cfg)


def test_tensor_problems_are_listed():
    arch = arch_from_hf_config(_cfg())
    shapes = {n: s for r in all_rules(arch) for n, s in zip(r.hf, r.hf_shapes)}
    bad = dict(shapes)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.layers.0.self_attn.k_proj.weight"] = (64, 64)
    bad["model.layers.0.extra.weight"] = (3,)
    with pytest.raises(ConversionError) as err:
        check_hf_tensors(arch, bad)
    msg = str(err.value)
    assert "missing tensors (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unknown tensors (1): model.layers.0.extra.weight" in msg
    assert "'model.layers.0.self_attn.k_proj.weight' has shape [64, 64] but config.json implies [32, 64]" in msg
    assert "num_key_value_heads=2" in msg
    # non-parameter buffers are reported as ignored, not converted
    assert check_hf_tensors(arch, {**shapes, "model.layers.0.self_attn.rotary_emb.inv_freq": (8,)}) == [
        "model.layers.0.self_attn.rotary_emb.inv_freq"]


# ---- RoPE check -------------------------------------------------------------------------------------


def test_expected_inv_freq_matches_transformers_llama3_and_default():
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from rfpo_megatron.convert.validate import expected_inv_freq

    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    cfg = tf.LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0, rope_scaling=rs)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    arch = arch_from_hf_config(cfg.to_dict())
    assert arch.rope_type == "llama3" and arch.head_dim == 128
    ours = expected_inv_freq(arch)
    assert torch.allclose(ours.float(), hf_inv.float(), rtol=1e-6)
    assert (ours < 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128) - 1e-12).any()  # scaling acts
    plain = arch_from_hf_config(_cfg(rope_theta=1e6))
    assert torch.allclose(expected_inv_freq(plain), 1.0 / 1e6 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))


def test_rope_mismatch_names_rope_theta():
    from types import SimpleNamespace

    from rfpo_megatron.convert.validate import expected_inv_freq, rope_diffs

    arch = arch_from_hf_config(_cfg(rope_theta=1e6))
    good = SimpleNamespace(rotary_pos_emb=SimpleNamespace(inv_freq=expected_inv_freq(arch).float()))
    assert rope_diffs(arch, good) == []
    other = arch_from_hf_config(_cfg(rope_theta=1e4))
    bad = SimpleNamespace(rotary_pos_emb=SimpleNamespace(inv_freq=expected_inv_freq(other).float()))
    (msg,) = rope_diffs(arch, bad)
    assert "rope_theta=1e+06" in msg and "rotary frequencies differ" in msg


# ---- per-rank slice reading (hf_load) equals the full-tensor path --------------------------------------


@pytest.mark.parametrize("model_type,nq,ng", [("qwen2", 8, 4), ("qwen3", 8, 2), ("llama", 4, 1)])
def test_read_hf_shard_equals_full_then_split(tmp_path, model_type, nq, ng):
    """Each TP rank's slice read from disk == shard_tp of the fully converted tensor (incl. ng < TP and all-padding ranks)."""
    import json

    from safetensors.torch import save_file

    from rfpo_megatron.convert.hf_io import HFReader
    from rfpo_megatron.convert.hf_load import read_hf_shard
    from rfpo_megatron.convert.mapping import hf_to_mcore_tensor

    cfg = _cfg(model_type, num_attention_heads=nq, num_key_value_heads=ng, head_dim=8, tie_word_embeddings=False)
    arch = arch_from_hf_config(cfg)
    g = torch.Generator().manual_seed(nq + ng)
    tensors = {n: torch.randn(s, generator=g) for r in all_rules(arch) for n, s in zip(r.hf, r.hf_shapes)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    reader = HFReader(tmp_path)
    for tp in (1, 2, 4):
        vp = padded_vocab(arch.vocab_size, tp)
        for rule in all_rules(arch):
            full = hf_to_mcore_tensor(arch, rule, [tensors[n] for n in rule.hf])
            for rank in range(tp):
                want = shard_tp(rule.mcore, full, tp, rank, padded_vocab=vp)
                got = read_hf_shard(arch, rule, reader, tp, rank, padded_vocab=vp if tp_kind(rule.mcore) == "vocab" else None)
                assert torch.equal(got, want), f"{rule.mcore} tp={tp} rank={rank}"
