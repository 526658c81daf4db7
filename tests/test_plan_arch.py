"""The planner reads HF configs and pads the vocabulary exactly as the actor does (one reader, one rule).

For each supported family the tiny HF configs of the conversion tests (tests/test_convert_dist.py::make_hf_model,
built with `transformers` and saved with save_pretrained) go through `rfpo-megatron plan --model DIR`'s reader and
through `convert.arch.arch_from_hf_config` (what `actor.model.build_model` reads); the shapes, qkv_bias, qk_norm
and the padded vocabulary must agree, and the planner's per-TP-rank parameter sizes must equal the conversion
mapping's megatron shapes sharded by `convert.sharding.shard_tp` (the split the checkpoint loaders apply to real
models). Configs the actor cannot build are refused by the planner with one line naming the field.
"""
from __future__ import annotations

import json
import socket

import pytest
import torch

from rfpo_megatron import plan as P
from rfpo_megatron.actor import model as actor_model
from rfpo_megatron.actor.model import padded_vocab_size
from rfpo_megatron.convert.arch import SUPPORTED_MODEL_TYPES, ConversionError, arch_from_hf_config
from rfpo_megatron.convert.mapping import all_rules
from rfpo_megatron.convert.sharding import shard_tp

FAMILIES = ("qwen2", "llama", "qwen3")
SHAPE_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "tie_embeddings", "qkv_bias", "qk_norm")


def hf_config(family: str, **extra):
    """The configs of tests/test_convert_dist.py::make_hf_model (vocab 300 is padded by megatron)."""
    import transformers as tf

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    common.update(extra)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-5,
                              **common)
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=1e-6, **common)
    return tf.Qwen3Config(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, **common)


def _saved(cfg, path) -> str:
    cfg.save_pretrained(path)  # config.json as shipped with a checkpoint
    return str(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_planner_shape_equals_actor_arch(family, tmp_path):
    cfg = hf_config(family)
    m = P.shape_from_hf(_saved(cfg, tmp_path))  # `--model DIR`
    arch = arch_from_hf_config(cfg)  # what build_model reads (from the PretrainedConfig, not the file)
    assert {f: getattr(m, f) for f in SHAPE_FIELDS} == {
        "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size, "ffn_hidden_size": arch.ffn_hidden_size,
        "num_layers": arch.num_layers, "num_heads": arch.num_heads, "num_kv_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim, "tie_embeddings": arch.tie_embeddings, "qkv_bias": arch.qkv_bias,
        "qk_norm": arch.qk_norm}
    # the family switches themselves (Qwen2: q/k/v bias; Qwen3: q/k norm and head_dim 24 != 64/4)
    assert (m.qkv_bias, m.qk_norm) == {"qwen2": (True, False), "llama": (False, False), "qwen3": (False, True)}[family]
    assert m.head_dim == (24 if family == "qwen3" else 16)
    # the same config as a dict / a PretrainedConfig gives the same shape
    assert P.shape_from_hf(cfg.to_dict(), name=str(tmp_path)) == m == P.shape_from_hf(cfg, name=str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_per_rank_params_equal_conversion_shards(family, tp, tmp_path):
    """Every parameter of TP rank 0 (PP = 1): the planner's numel == the conversion mapping's megatron tensor
    sharded by shard_tp with the actor's padded vocab. Covers qkv bias (qwen2), q/k norm (qwen3), a tied
    embedding with one kv head split over tp = 2, 4 (llama), and vocab 300 -> 384 / 512 / 512."""
    cfg = hf_config(family)
    arch = arch_from_hf_config(cfg)
    m = P.shape_from_hf(_saved(cfg, tmp_path))
    vp = padded_vocab_size(arch.vocab_size, tp)
    assert P.padded_vocab(m.vocab_size, tp) == vp == {1: 384, 2: 512, 4: 512}[tp]
    plan = {n: k for n, k, _ in P.stage_params(m, tp=tp, pp=1, stage=0)}
    conv = {r.mcore: shard_tp(r.mcore, torch.zeros(r.mcore_shape), tp, 0, padded_vocab=vp).numel()
            for r in all_rules(arch)}
    assert plan == conv
    assert plan["embedding.word_embeddings.weight"] == vp // tp * arch.hidden_size
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in plan) is arch.qkv_bias


def test_padding_rule_is_the_actors(monkeypatch):
    """The planner has no padding rule of its own: it follows convert.arch.padded_vocab, which the actor
    uses too (actor.model.padded_vocab_size is that function)."""
    from rfpo_megatron.convert import arch as arch_mod

    assert actor_model.padded_vocab_size is arch_mod.padded_vocab
    for v, tp in [(300, 1), (300, 2), (151936, 8), (152064, 4), (128256, 8)]:
        assert P.padded_vocab(v, tp) == padded_vocab_size(v, tp) == -(-v // (128 * tp)) * 128 * tp
    monkeypatch.setattr(arch_mod, "padded_vocab", lambda vocab, tp, multiple=128: 7 * tp)
    assert P.padded_vocab(300, 2) == 14
    m = P.shape_from_hf("qwen2.5-7b")
    assert dict((n, k) for n, k, _ in P.stage_params(m, 2, 1, 0))["embedding.word_embeddings.weight"] == 7 * 3584


def test_presets_are_actor_archs_without_network(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the planner must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for name, cfg in P.PRESETS.items():
        m = P.shape_from_hf(name)
        try:
            arch = arch_from_hf_config(cfg)
        except ConversionError:
            # qwen3-30b-a3b before convert.arch reads Qwen3-MoE (issue 15's expert-parallel work): its attention
            # and embedding part is Qwen3's; the experts are checked in tests/test_plan_moe.py
            assert cfg["model_type"] == "qwen3_moe", name
            arch = arch_from_hf_config({**{k: v for k, v in cfg.items() if k != "num_experts"}, "model_type": "qwen3"})
        assert m.name == name and (m.qkv_bias, m.qk_norm) == (arch.qkv_bias, arch.qk_norm)
        assert (m.num_kv_heads, m.head_dim, m.vocab_size) == (arch.num_kv_heads, arch.head_dim, arch.vocab_size)
    assert P.main(["--model", "qwen2.5-32b", "--tp", "4", "--pp", "2", "--json"]) == 0


def _cli_error(capsys, path, cfg) -> str:
    path.write_text(json.dumps(cfg))
    capsys.readouterr()  # drop earlier output (e.g. import warnings of megatron)
    assert P.main(["--model", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_or_unsupported_configs_are_one_line_naming_the_field(tmp_path, capsys):
    base = hf_config("llama").to_dict()
    p = tmp_path / "config.json"
    # a family the actor does not build: the supported ones and the way to proceed are named
    err = _cli_error(capsys, p, {**base, "model_type": "mistral"})
    assert "model_type='mistral'" in err and ", ".join(SUPPORTED_MODEL_TYPES) in err and "copy of its config.json" in err
    assert "model_type=None" in _cli_error(capsys, p, {k: v for k, v in base.items() if k != "model_type"})
    err = _cli_error(capsys, p, {k: v for k, v in base.items() if k != "intermediate_size"})
    assert "'intermediate_size' is missing" in err and str(p) in err
    assert "'num_key_value_heads'=3" in _cli_error(capsys, p, {**base, "num_key_value_heads": 3})
    assert "'num_experts'" in _cli_error(capsys, p, {**base, "model_type": "qwen2", "num_experts": 8})
    assert "'attention_bias'" in _cli_error(capsys, p, {**base, "attention_bias": True})
    p.write_text("{not json")
    assert P.main(["--model", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "JSON" in err


def test_biased_llama_is_refused_like_the_actor(tmp_path, capsys):
    """attention_bias = mlp_bias = True is a valid Arch (conversion handles it) but the actor cannot build it
    (add_bias_linear=False): the planner refuses it too, naming the field."""
    cfg = hf_config("llama", attention_bias=True, mlp_bias=True)
    assert arch_from_hf_config(cfg).mlp_bias
    with pytest.raises(ValueError, match="mlp_bias"):
        actor_model.transformer_config_from_hf(cfg, tp=1, pp=1)
    err = _cli_error(capsys, tmp_path / "config.json", cfg.to_dict())
    assert "'mlp_bias'" in err
