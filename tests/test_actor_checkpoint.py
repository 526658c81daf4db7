"""Actor checkpoints survive a real SIGKILL during save: the previous checkpoint stays loadable and exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from rfpo_megatron.actor.checkpoint import latest_step_dir, step_dir_name
from rfpo_megatron.actor.launch import free_port, spawn_world

HF = dict(
    model_type="llama",
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=96,
    vocab_size=200,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    max_position_embeddings=64,
)

CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {testdir!r})
    from test_actor_checkpoint import make_actor, batch, IDS
    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.actor.checkpoint import save_actor_state
    from rfpo_megatron.config import AlgoConfig
    init_parallel(tp=1, pp=1, seed=3)
    a = make_actor()
    b = batch()
    b.old_logp = a.compute_logprobs(b)[0]
    a.train_step(b, AlgoConfig())
    save_actor_state(a, {ckpt!r})
    torch.save(a.forward_logits(IDS), {logits!r})
    print("SAVED1", flush=True)
    a.train_step(b, AlgoConfig())
    real_save = torch.save
    def slow_save(obj, f, *args, **kw):
        real_save(obj, f, *args, **kw)
        print("MIDSAVE", flush=True)
        time.sleep(120)
    torch.save = slow_save
    save_actor_state(a, {ckpt!r})
    print("UNREACHABLE", flush=True)
    """
)

IDS = torch.arange(24).reshape(2, 12) * 7 % 200


def make_actor():
    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.config import ActorConfig

    return Actor(HF, ActorConfig(lr=1e-2, max_tokens_per_gpu=32), total_steps=3)


def batch():
    from rfpo_megatron.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, 200, (n,), generator=g) for n in (9, 12, 7)]
    b = ActorBatch(input_ids=ids, prompt_lens=[4, 3, 2])
    b.advantages = [torch.randn(r, generator=g) for r in b.response_lens]
    return b


def _load_and_check(rank, ckpt):
    from rfpo_megatron.actor.checkpoint import load_actor_state, save_actor_state
    from rfpo_megatron.actor.parallel import init_parallel

    init_parallel(tp=1, pp=1, seed=3)
    a = make_actor()
    meta = load_actor_state(a, ckpt)
    logits = a.forward_logits(IDS)
    path = save_actor_state(a, ckpt, step=5)  # a later save cleans the stale partial directory
    return {"meta": meta, "logits": logits, "path": path, "listing": sorted(os.listdir(ckpt))}


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    logits_file = str(tmp_path / "logits1.pt")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(testdir=os.path.dirname(__file__), ckpt=ckpt, logits=logits_file))
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, text=True)
    seen = []
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:
            seen.append(line.strip())
            if line.strip() == "MIDSAVE":
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, seen
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert seen[-2:] == ["SAVED1", "MIDSAVE"], seen
    assert proc.returncode == -signal.SIGKILL
    # the partial save is visible on disk, and "latest" still names step 1
    assert os.path.isdir(os.path.join(ckpt, step_dir_name(2) + ".tmp"))
    assert not os.path.exists(os.path.join(ckpt, step_dir_name(2)))
    assert latest_step_dir(ckpt) == os.path.join(ckpt, step_dir_name(1))

    out = spawn_world(_load_and_check, 1, ckpt)[0]
    assert out["meta"]["step"] == 1
    want = torch.load(logits_file)
    assert torch.equal(out["logits"], want)  # same layout: bit-identical
    assert out["listing"] == ["latest", step_dir_name(1), step_dir_name(5)]
    assert latest_step_dir(ckpt) == out["path"]


def _dist_format_world(rank, ckpt):
    from rfpo_megatron.actor.checkpoint import load_actor_state, save_actor_state
    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel
    from rfpo_megatron.config import ActorConfig, AlgoConfig

    def actor(tp, pp):
        from rfpo_megatron.actor.actor import Actor

        return Actor(HF, ActorConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, lr=1e-2,
                                     adam_eps=1e-3, max_tokens_per_gpu=32), total_steps=3)

    init_parallel(tp=2, pp=1, seed=3)
    a = actor(2, 1)
    b = batch()
    old = a.compute_logprobs(b)[0]
    b.old_logp = old
    a.train_step(b, AlgoConfig())
    path = save_actor_state(a, ckpt, fmt="dist")
    out = {"files": sorted(os.listdir(path)), "logits": a.forward_logits(IDS)}
    out["loss2"] = a.train_step(b, AlgoConfig())["train/loss"]  # old log-probs are stale: loss depends on weights
    out["logits3"] = a.forward_logits(IDS)  # after step 2: depends on the restored Adam moments and LR
    del a
    destroy_parallel(keep_process_group=True)
    init_parallel(tp=1, pp=2, seed=3)
    a = actor(1, 2)
    meta = load_actor_state(a, ckpt)
    out.update(meta=meta, logits_pp2=a.forward_logits(IDS), step=a.step)
    b.old_logp = old
    out["loss2_pp2"] = a.train_step(b, AlgoConfig())["train/loss"]
    out["logits3_pp2"] = a.forward_logits(IDS)
    return out


def test_dist_format_tp2_to_pp2_over_gloo(tmp_path):
    """megatron dist_checkpointing (the GPU default) on CPU: TP=2 save -> PP=2 load, model + optimizer."""
    outs = spawn_world(_dist_format_world, 2, str(tmp_path / "ckpt"), timeout_s=400)
    for out in outs:
        assert out["meta"]["format"] == "dist" and out["meta"]["dist_optimizer_saved"] is True
        assert "dist" in out["files"] and out["step"] == 1
        assert float((out["logits_pp2"] - out["logits"]).abs().max()) <= 1e-5
        assert abs(out["loss2_pp2"] - out["loss2"]) <= 1e-6
        assert float((out["logits3_pp2"] - out["logits3"]).abs().max()) <= 1e-5
        assert float((out["logits3"] - out["logits"]).abs().max()) > 1e-3  # step 2 did move the weights


def test_one_step_dir_vocabulary_reads_old_names_and_prunes_by_step(tmp_path):
    """step_%06d is the one format; a `latest` naming an old step_%08d (actor) directory still resolves, and
    pruning orders mixed names by step number, not by string."""
    from rfpo_megatron.actor.checkpoint import prune_step_dirs, write_latest

    assert step_dir_name(7) == "step_000007"
    root = tmp_path / "c"
    for name in ("step_00000010", "step_000005", "step_000020"):
        (root / name).mkdir(parents=True)
        (root / name / "meta.json").write_text("{}")
    write_latest(str(root), "step_00000010")
    assert latest_step_dir(str(root)) == str(root / "step_00000010")
    assert latest_step_dir(str(root), "trainer_state.pt") is None
    with pytest.raises(FileNotFoundError, match="trainer_state.pt is missing"):
        latest_step_dir(str(root), "trainer_state.pt", strict=True)
    prune_step_dirs(str(root), 2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010", "step_000020"]
