"""The conversion tools end to end: HF → Megatron → HF is bit-identical and loads in transformers; mismatches fail loudly.

Uses real tiny HF models (Qwen2, Llama tied, Qwen3) saved with save_pretrained plus a real tokenizer, the
`rfpo-megatron convert` entry point and the tools/ wrappers as a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rfpo_megatron.cli import main as cli_main
from test_convert_dist import FAMILIES, hf_logits, make_hf_model, read_hf_dir

ROOT = Path(__file__).resolve().parents[1]


def _save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(298)} | {"<unk>": 298, "</s>": 299}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_tools")
    out = {}
    for fam in FAMILIES:
        model = make_hf_model(fam, seed=5)
        d = root / fam
        model.save_pretrained(d)
        _save_tokenizer(d)
        out[fam] = d
    return out


def _convert(*args: str) -> int:
    return cli_main(["convert", *args, "--no-progress"])


@pytest.mark.parametrize("fam,fmt", [("qwen2", "actor"), ("llama", "sharded"), ("qwen3", "actor"), ("qwen3", "sharded")])
def test_roundtrip_bit_identical_and_loads(fam, fmt, hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    src = hf_dirs[fam]
    mc, back = tmp_path / "mc", tmp_path / "back"
    assert _convert("hf2mcore", "--hf-dir", str(src), "--out", str(mc), "--tp", "2", "--pp", "2", "--format", fmt) == 0
    if fmt == "sharded":
        assert sorted(p.name for p in mc.iterdir()) == ["hf", "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000",
                                                        "mp_rank_01_001", "rfpo_mcore.json"]
        meta = json.loads((mc / "rfpo_mcore.json").read_text())
        assert (meta["tp"], meta["pp"], meta["stages"], meta["vocab_size"], meta["padded_vocab_size"]) == (2, 2, [[0, 1], [1, 2]], 300, 512)
    else:
        assert sorted(p.name for p in mc.iterdir()) == ["hf", "meta.json", "model_pp0.pt", "model_pp1.pt", "optim_pp0.pt", "optim_pp1.pt"]
        meta = json.loads((mc / "meta.json").read_text())
        assert (meta["format"], meta["tp"], meta["pp"], meta["vocab_size"], meta["step"]) == ("full", 2, 2, 300, 0)
        stage0 = torch.load(mc / "model_pp0.pt", weights_only=True)
        assert "embedding.word_embeddings.weight" in stage0 and "decoder.layers.0.mlp.linear_fc1.weight" in stage0
        assert not any(k.startswith("decoder.layers.1.") for k in stage0)
        assert stage0["embedding.word_embeddings.weight"].shape == (300, 64)  # full, unpadded
    assert _convert("mcore2hf", "--mcore-dir", str(mc), "--out", str(back), "--max-shard-gb", str(60_000 / 1024**3)) == 0

    a, b = read_hf_dir(src), read_hf_dir(back)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    # several shards (60 kB limit), each listed in the index; every tensor once
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in back.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards) and set(index["weight_map"]) == set(a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes(), name

    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(make_hf_model(fam, seed=5), ids)
    loaded = AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
    assert torch.equal(hf_logits(loaded, ids), ref)
    assert PreTrainedTokenizerFast.from_pretrained(back)("w3 w7").input_ids == [3, 7]


def test_layouts_give_identical_hf(hf_dirs, tmp_path):
    """TP=1/PP=1 and TP=2/PP=1 checkpoints of the same model export identical HF tensors."""
    src = hf_dirs["qwen3"]
    outs = []
    for tp, pp in ((1, 1), (2, 1)):
        mc, back = tmp_path / f"mc{tp}{pp}", tmp_path / f"back{tp}{pp}"
        assert _convert("hf2mcore", "--hf-dir", str(src), "--out", str(mc), "--tp", str(tp), "--pp", str(pp)) == 0
        assert _convert("mcore2hf", "--mcore-dir", str(mc), "--out", str(back)) == 0
        outs.append(read_hf_dir(back))
    assert set(outs[0]) == set(outs[1]) and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_dtype_cast_and_tied_lm_head_in_file(hf_dirs, tmp_path):
    src = tmp_path / "llama"
    shutil.copytree(hf_dirs["llama"], src)
    f = next(src.glob("*.safetensors"))
    tensors = load_file(f)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, f, metadata={"format": "pt"})
    mc, back = tmp_path / "mc", tmp_path / "back"
    assert _convert("hf2mcore", "--hf-dir", str(src), "--out", str(mc), "--dtype", "bf16") == 0
    assert _convert("mcore2hf", "--mcore-dir", str(mc), "--out", str(back)) == 0
    out = read_hf_dir(back)
    assert "lm_head.weight" not in out and all(t.dtype == torch.bfloat16 for t in out.values())
    assert torch.equal(out["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"].to(torch.bfloat16))
    cfg = json.loads((back / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    # a tied model whose lm_head differs from the embedding is refused
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1}, f, metadata={"format": "pt"})
    with pytest.raises(Exception, match="lm_head.weight differs"):
        from rfpo_megatron.offline.tools import hf_to_mcore

        hf_to_mcore(src, tmp_path / "mc2", progress=False)


# ---- mismatches fail, naming the field or tensor -----------------------------------------------------


def _run_expect_fail(capsys, *args: str) -> str:
    assert _convert(*args) == 2
    return capsys.readouterr().err


def test_wrong_num_key_value_heads_names_field(hf_dirs, tmp_path, capsys):
    src = tmp_path / "qwen2"
    shutil.copytree(hf_dirs["qwen2"], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 1}))
    err = _run_expect_fail(capsys, "hf2mcore", "--hf-dir", str(src), "--out", str(tmp_path / "mc"))
    assert "model.layers.0.self_attn.k_proj.weight' has shape [32, 64] but config.json implies [16, 64]" in err
    assert "num_key_value_heads=1" in err
    assert not (tmp_path / "mc" / "rfpo_mcore.json").exists()


def test_missing_and_unknown_tensors_listed(hf_dirs, tmp_path, capsys):
    src = tmp_path / "qwen3"
    shutil.copytree(hf_dirs["qwen3"], src)
    f = next(src.glob("*.safetensors"))
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, f, metadata={"format": "pt"})
    err = _run_expect_fail(capsys, "hf2mcore", "--hf-dir", str(src), "--out", str(tmp_path / "mc"))
    assert "missing tensors (1): model.layers.1.self_attn.k_norm.weight" in err
    assert "unknown tensors (1): model.layers.0.mlp.extra_proj.weight" in err


def test_mcore_side_problems_fail(hf_dirs, tmp_path, capsys):
    mc = tmp_path / "mc"
    assert _convert("hf2mcore", "--hf-dir", str(hf_dirs["qwen2"]), "--out", str(mc), "--tp", "2", "--format", "sharded") == 0
    # --hf-ref describing another architecture
    ref = tmp_path / "ref"
    shutil.copytree(hf_dirs["qwen2"], ref)
    cfg = json.loads((ref / "config.json").read_text())
    (ref / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    err = _run_expect_fail(capsys, "mcore2hf", "--mcore-dir", str(mc), "--out", str(tmp_path / "o1"), "--hf-ref", str(ref))
    assert "intermediate_size (ffn_hidden_size)" in err and "has 128" in err and "has 96" in err
    # a rank file that lost a tensor
    f = mc / "mp_rank_01_000" / "model.safetensors"
    tensors = load_file(f)
    del tensors["decoder.layers.1.mlp.linear_fc2.weight"]
    save_file(tensors, f)
    err = _run_expect_fail(capsys, "mcore2hf", "--mcore-dir", str(mc), "--out", str(tmp_path / "o2"))
    assert "mp_rank_01_000: missing tensors ['decoder.layers.1.mlp.linear_fc2.weight']" in err
    # not a checkpoint / bad layout
    err = _run_expect_fail(capsys, "mcore2hf", "--mcore-dir", str(tmp_path), "--out", str(tmp_path / "o3"))
    assert "rfpo_mcore.json not found" in err
    err = _run_expect_fail(capsys, "hf2mcore", "--hf-dir", str(hf_dirs["qwen2"]), "--out", str(tmp_path / "o4"), "--pp", "3")
    assert "--pp=3 must divide num_hidden_layers=2" in err
    err = _run_expect_fail(capsys, "hf2mcore", "--hf-dir", str(hf_dirs["qwen2"]), "--out", str(tmp_path / "o5"), "--tp", "3")
    assert "num_attention_heads=4 is not divisible" in err
    err = _run_expect_fail(capsys, "hf2mcore", "--hf-dir", str(hf_dirs["qwen2"]), "--out", str(mc))
    assert "is not empty" in err


def test_actor_format_problems_fail(hf_dirs, tmp_path, capsys):
    mc = tmp_path / "mc"
    assert _convert("hf2mcore", "--hf-dir", str(hf_dirs["qwen3"]), "--out", str(mc), "--pp", "2") == 0
    state = torch.load(mc / "model_pp1.pt", weights_only=True)
    state["decoder.layers.1.self_attention.linear_qkv.weight"] = state["decoder.layers.1.self_attention.linear_qkv.weight"][:-24]
    del state["decoder.final_layernorm.weight"]
    torch.save(state, mc / "model_pp1.pt")
    err = _run_expect_fail(capsys, "mcore2hf", "--mcore-dir", str(mc), "--out", str(tmp_path / "o1"))
    assert "missing tensors (1): decoder.final_layernorm.weight" in err
    assert "'decoder.layers.1.self_attention.linear_qkv.weight' has shape [168, 64], config implies [192, 64]" in err
    # a checkpoint without a recorded HF config needs --hf-ref
    meta = json.loads((mc / "meta.json").read_text())
    (mc / "meta.json").write_text(json.dumps({**meta, "extra": {}}))
    err = _run_expect_fail(capsys, "mcore2hf", "--mcore-dir", str(mc), "--out", str(tmp_path / "o2"))
    assert "pass --hf-ref" in err


def test_trainer_step_dir_finds_base_config(hf_dirs, tmp_path):
    """A trainer checkpoint (step_N/actor/latest → step_…/meta.json, step_N/config.yaml) converts without --hf-ref."""
    mc = tmp_path / "mc"
    assert _convert("hf2mcore", "--hf-dir", str(hf_dirs["llama"]), "--out", str(mc), "--pp", "2") == 0
    step = tmp_path / "run" / "step_000100"
    actor_step = step / "actor" / "step_00000100"
    shutil.copytree(mc, actor_step)
    shutil.rmtree(actor_step / "hf")
    meta = json.loads((actor_step / "meta.json").read_text())
    (actor_step / "meta.json").write_text(json.dumps({**meta, "step": 100, "extra": {}}))
    (step / "actor" / "latest").write_text("step_00000100\n")
    (step / "config.yaml").write_text(f"actor:\n  hf_model_path: {hf_dirs['llama']}\n")
    back = tmp_path / "back"
    assert _convert("mcore2hf", "--mcore-dir", str(step), "--out", str(back)) == 0
    a, b = read_hf_dir(hf_dirs["llama"]), read_hf_dir(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (back / "tokenizer.json").read_bytes() == (hf_dirs["llama"] / "tokenizer.json").read_bytes()


def test_cli_help_lists_both_directions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["convert", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "hf2mcore" in out and "mcore2hf" in out


def test_tool_wrappers_run_as_scripts(hf_dirs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    mc, back = tmp_path / "mc", tmp_path / "back"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", str(hf_dirs["llama"]),
                        "--out", str(mc), "--tp", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "hf→mcore" in r.stderr  # the progress bar
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_megatron_to_hf.py"), "--mcore-dir", str(mc),
                        "--out", str(back)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = read_hf_dir(hf_dirs["llama"]), read_hf_dir(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
