"""HF → Megatron on real gloo ranks: logits equal the HF model's at TP = 1, 2 and PP = 1, 2; weight export equals the tool.

One 2-process world runs the layouts (tp, pp) = (2, 1), (1, 2), (1, 1) in turn (megatron's model-parallel
groups are rebuilt between them). For each family (Qwen2 untied with rope θ = 1e6; Llama tied with a single
KV head, so num_query_groups < TP; Qwen3 with q/k norm and head_dim ≠ hidden/heads) every layout:

- loads the offline tool's checkpoint of the same layout, of another layout, and the HF directory directly,
  and compares fp32 logits with the HF transformers model (max abs diff ≤ 1e-4);
- `iter_hf_weights` (union over PP stages) is bit-identical, name for name, to the to-HF tool's output;
- `gather_full_state` equals the TP-merged tensors on disk, and `save_weights` writes the tool's exact files.

The TP = 2 × PP = 2 world (4 processes) is the slow variant.
"""
from __future__ import annotations

import glob
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

FAMILIES = ("qwen2", "llama", "qwen3")
SEQ = (2, 7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_hf_model(family: str, seed: int = 0):
    """A tiny random HF model of `family` (fp32) built from a config; vocab 300 is padded by megatron."""
    import transformers as tf

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if family == "qwen2":
        cfg = tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-5, **common)
    elif family == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=1e-6, **common)
    else:
        cfg = tf.Qwen3Config(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, **common)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # non-trivial norms so that a swapped layernorm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def read_hf_dir(path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """HF dirs, reference logits and tool outputs at (1,1), (2,1), (1,2), (2,2) for every family."""
    from rfpo_megatron.offline.tools import hf_to_mcore, mcore_to_hf

    root = tmp_path_factory.mktemp("convert_dist")
    ids = torch.randint(0, 300, SEQ, generator=torch.Generator().manual_seed(7))
    torch.save(ids, root / "ids.pt")
    for fam in FAMILIES:
        model = make_hf_model(fam)
        model.save_pretrained(root / fam / "hf")
        torch.save(hf_logits(model, ids), root / fam / "ref_logits.pt")
        for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
            ck = root / fam / f"mc_tp{tp}_pp{pp}"
            hf_to_mcore(root / fam / "hf", ck, tp=tp, pp=pp, fmt="sharded", progress=False)
            mcore_to_hf(ck, root / fam / f"back_tp{tp}_pp{pp}", progress=False)
        hf_to_mcore(root / fam / "hf", root / fam / "actor_ckpt", tp=2, pp=1, fmt="actor", progress=False)
    return root


# ---- worker side ---------------------------------------------------------------------------------


def _forward_logits(chunks, ids: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [b, s, Vp] on the last PP stage (None elsewhere); manual p2p between stages."""
    from megatron.core import parallel_state as mpu

    model = chunks[0]
    b, s = ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    h = model.config.hidden_size
    with torch.no_grad():
        if not mpu.is_pipeline_first_stage():
            recv = torch.empty(s, b, h, dtype=model.config.params_dtype)
            dist.recv(recv, src=mpu.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(recv)
        out = model(ids, pos, None)
        if not mpu.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=mpu.get_pipeline_model_parallel_next_rank())
            return None
        tp = mpu.get_tensor_model_parallel_world_size()
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=mpu.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=-1)


def _check_logits(chunks, ids, ref, tag):
    got = _forward_logits(chunks, ids)
    if got is None:
        return
    v = ref.shape[-1]
    diff = (got[..., :v] - ref).abs().max().item()
    print(f"[convert-dist] {tag}: max abs logit diff {diff:.2e}", flush=True)
    assert diff <= 1e-4, f"{tag}: max abs logit diff {diff}"


def _run_layout(root, tp, pp, rank, check_save):
    from megatron.core import parallel_state as mpu

    from rfpo_megatron.actor.model import build_model
    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.convert.export import iter_hf_weights
    from rfpo_megatron.convert.hf_io import read_hf_config
    from rfpo_megatron.convert.mcore_io import load_weights, rank_file, read_full_tensors, read_meta, save_weights
    from rfpo_megatron.convert.hf_load import load_hf_into_model
    from rfpo_megatron.convert.sharding import gather_full_state

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    init_parallel(tp=tp, pp=pp, seed=1)
    ids = torch.load(root / "ids.pt")
    other = {(1, 1): (2, 1), (2, 1): (1, 2), (1, 2): (2, 2), (2, 2): (1, 1)}[(tp, pp)]
    for fam in FAMILIES:
        tag = f"{fam} tp={tp} pp={pp} rank={rank}"
        cfg = read_hf_config(root / fam / "hf")
        ref = torch.load(root / fam / "ref_logits.pt")
        chunks = build_model(cfg, params_dtype=torch.float32, spec="local")
        for c in chunks:
            c.eval()
        # 1) the tool's checkpoint of the same layout, 2) of another layout, 3) HF directly
        ck = root / fam / f"mc_tp{tp}_pp{pp}"
        load_weights(chunks, ck)
        _check_logits(chunks, ids, ref, tag + " same-layout ckpt")
        load_weights(chunks, root / fam / f"mc_tp{other[0]}_pp{other[1]}")
        _check_logits(chunks, ids, ref, tag + f" ckpt from tp={other[0]} pp={other[1]}")
        load_hf_into_model(chunks, root / fam / "hf")
        _check_logits(chunks, ids, ref, tag + " HF dir")

        # the actor's own checkpoint loader reads the tool's actor-format output; the actor's forward agrees;
        # the actor's save at this layout converts back to the original HF tensors bit for bit
        from rfpo_megatron.actor.actor import Actor
        from rfpo_megatron.actor.checkpoint import load_actor_state, save_actor_state
        from rfpo_megatron.config import ActorConfig
        from rfpo_megatron.offline.tools import mcore_to_hf

        actor = Actor(cfg, ActorConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                      spec="local", with_optimizer=False)
        load_actor_state(actor, str(root / fam / "actor_ckpt"), load_optimizer=False, load_rng=False)
        diff = (actor.forward_logits(ids) - ref).abs().max().item()
        print(f"[convert-dist] {tag} actor.forward_logits after load_actor_state: max abs diff {diff:.2e}", flush=True)
        assert diff <= 1e-4, f"{tag}: actor logits after loading the tool's checkpoint differ by {diff}"
        saved = save_actor_state(actor, str(root / fam / f"actor_saved_tp{tp}_pp{pp}"), step=3, fmt="full")
        if (tp, pp) == (2, 1):  # megatron dist_checkpointing format; converted by the parent (own process)
            save_actor_state(actor, str(root / fam / "actor_dist_tp2"), step=3, fmt="dist")
        if dist.get_rank() == 0:
            back = root / fam / f"actor_saved_back_tp{tp}_pp{pp}"
            mcore_to_hf(os.path.dirname(saved), back, hf_ref=root / fam / "hf", progress=False)
            src, got = read_hf_dir(root / fam / "hf"), read_hf_dir(back)
            assert set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src), f"{tag}: actor save → HF differs"
        dist.barrier()

        # iter_hf_weights == the to-HF tool's tensors, bit for bit (this stage's share; union checked below)
        tool = read_hf_dir(root / fam / f"back_tp{tp}_pp{pp}")
        seen = []
        for bucket in iter_hf_weights(chunks, cfg, bucket_bytes=20_000):
            assert sum(t.numel() * t.element_size() for _, t in bucket) <= 20_000 or len(bucket) == 1, tag
            for name, tensor in bucket:
                assert name in tool, f"{tag}: exported unknown tensor {name}"
                assert tensor.dtype == tool[name].dtype and torch.equal(tensor, tool[name]), f"{tag}: {name} differs"
                seen.append(name)
        assert len(seen) == len(set(seen)), f"{tag}: duplicate exported names"
        all_seen: list = [None] * dist.get_world_size()
        dist.all_gather_object(all_seen, seen)
        union = set().union(*all_seen)
        assert union == set(tool), f"{tag}: export misses {sorted(set(tool) - union)[:5]}"

        # save_hf (in-process HF export, all ranks) writes the tool's tensors, with index and tokenizer files
        from rfpo_megatron.convert.export import save_hf

        out_hf = root / fam / f"save_hf_tp{tp}_pp{pp}"
        save_hf(chunks, cfg, out_hf, source_dir=root / fam / "hf", max_shard_bytes=50_000)
        if dist.get_rank() == 0:
            got = read_hf_dir(out_hf)
            assert set(got) == set(tool) and all(torch.equal(got[k], tool[k]) for k in tool), f"{tag}: save_hf differs"
            import json

            index = json.loads((out_hf / "model.safetensors.index.json").read_text())
            assert set(index["weight_map"]) == set(tool) and (out_hf / "generation_config.json").is_file(), tag
            if (tp, pp) == (2, 1):  # loads in transformers with the reference logits
                from transformers import AutoModelForCausalLM

                hf = AutoModelForCausalLM.from_pretrained(out_hf, attn_implementation="eager").eval()
                assert torch.equal(hf_logits(hf, ids), ref), f"{tag}: save_hf output gives other logits"
        dist.barrier()

        # gather_full_state == TP-merged tensors on disk (padded vocab kept / stripped)
        meta = read_meta(ck)
        full = gather_full_state(chunks, vocab_size=meta.vocab_size)
        disk = read_full_tensors(ck, meta, list(full))
        assert set(full) == set(meta.stage_names(mpu.get_pipeline_model_parallel_rank())), tag
        for name in full:
            assert torch.equal(full[name], disk[name]), f"{tag}: gathered {name} differs from disk"
        padded = gather_full_state(chunks)
        if "embedding.word_embeddings.weight" in padded:
            emb = padded["embedding.word_embeddings.weight"]
            assert emb.shape[0] == meta.padded_vocab_size and torch.all(emb[meta.vocab_size:] == 0), tag

        # save_weights writes exactly the tool's files (same layout, same names, same bytes)
        if check_save:
            out = root / fam / f"saved_tp{tp}_pp{pp}"
            save_weights(chunks, out, cfg, hf_source_dir=root / fam / "hf")
            t, p = mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank()
            mine, theirs = load_file(rank_file(out, t, p)), load_file(rank_file(ck, t, p))
            assert set(mine) == set(theirs), f"{tag}: saved names differ"
            assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"{tag}: saved tensors differ"
            saved_meta = read_meta(out)
            assert (saved_meta.stages, saved_meta.padded_vocab_size) == (meta.stages, meta.padded_vocab_size), tag
        dist.barrier()
    if (tp, pp) == (1, 1):  # a model built from a different config refuses the checkpoint, naming the field
        from rfpo_megatron.convert.arch import ConversionError

        cfg = dict(read_hf_config(root / "llama" / "hf"), num_key_value_heads=2)
        chunks = build_model(cfg, params_dtype=torch.float32, spec="local")
        try:
            load_weights(chunks, root / "llama" / "mc_tp2_pp1")
        except ConversionError as err:
            assert "num_key_value_heads=1 but megatron num_query_groups=2" in str(err), str(err)
        else:
            raise AssertionError("loading a checkpoint with num_key_value_heads=1 into a 2-group model did not fail")
        # load_full_state lists every missing / mis-shaped tensor and loads nothing
        from rfpo_megatron.convert.sharding import gather_full_state, load_full_state

        good = build_model(read_hf_config(root / "llama" / "hf"), params_dtype=torch.float32, spec="local")
        before = gather_full_state(good)
        bad_state = dict(before)
        del bad_state["decoder.layers.1.mlp.linear_fc2.weight"]
        bad_state["decoder.final_layernorm.weight"] = torch.zeros(3)
        bad_state["embedding.word_embeddings.weight"] = bad_state["embedding.word_embeddings.weight"] + 1
        try:
            load_full_state(good, bad_state)
        except ConversionError as err:
            msg = str(err)
            assert "missing tensor 'decoder.layers.1.mlp.linear_fc2.weight'" in msg, msg
            assert "decoder.final_layernorm.weight': full shape [3]" in msg, msg
        else:
            raise AssertionError("load_full_state accepted a state with a missing tensor")
        after = gather_full_state(good)
        assert all(torch.equal(before[k], after[k]) for k in before), "a failed load_full_state changed weights"


def _worker(rank, world, port, root, layouts, check_save):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from rfpo_megatron.actor.parallel import destroy_parallel

    try:
        for tp, pp in layouts:
            _run_layout(root, tp, pp, rank, check_save)
    finally:
        destroy_parallel()


def test_logits_and_export_tp2_pp2_tp1(assets):
    mp.spawn(_worker, args=(2, _free_port(), assets, [(2, 1), (1, 2), (1, 1)], True), nprocs=2, join=True)
    # the actor's TP=2 "dist" checkpoints (megatron dist_checkpointing) convert to the original HF tensors
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "convert_megatron_to_hf.py"
    for fam in FAMILIES:
        out = assets / fam / "dist_back"
        r = subprocess.run([sys.executable, str(tool), "--mcore-dir", str(assets / fam / "actor_dist_tp2"), "--out", str(out),
                            "--hf-ref", str(assets / fam / "hf"), "--no-progress"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        assert r.returncode == 0, r.stderr[-3000:]
        src, got = read_hf_dir(assets / fam / "hf"), read_hf_dir(out)
        assert set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src), f"{fam}: dist checkpoint → HF differs"


@pytest.mark.slow
def test_logits_and_export_tp2_x_pp2(assets):
    mp.spawn(_worker, args=(4, _free_port(), assets, [(2, 2)], True), nprocs=4, join=True)
