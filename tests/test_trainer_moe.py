"""The whole trainer on a tiny random Qwen3-MoE: RFPO on, routing replay (actor.router_replay=rollout), weight sync
into the embedded engine every step.

A real `rfpo-megatron train` subprocess (2 steps) against the embedded engine started with
--enable-return-routed-experts. Checks: it completes; `train/moe_aux_loss` is logged (megatron's switch loss,
1 for balanced routing); `train/router_replay_mismatch` is logged and 0.0 — with replay on, the
metric compares each layer's own top-k on the replayed inputs with the engine's, and the engine (HF fp32) and the
actor (megatron fp32) hold the same weights at the first update of each step, so only near-ties could differ;
`train/rollout_logprob_gap_max` (|actor log-prob - engine log-prob| over the sampled tokens, rollout correction
on) is ~1e-6 at step 2 too, whose rollout was sampled from the weights synced after step 1's update
(grad_norm > 0): the engine's weights after the sync equal the actor's. (Control, measured once with the trainer's
sync_weights patched out: step 2 then has rollout_logprob_gap_max 1.26 and router_replay_mismatch 0.31.)
"""
from __future__ import annotations

import os
import subprocess

import pytest

from test_trainer_fixtures import ROOT, run_trainer_cmd, tiny_overrides, trainer_env
from tiny_hf import MOE_HF, make_tiny_moe

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")


def _assets(root: str) -> dict:
    """Char tokenizer + tiny random Qwen3-MoE (tests/tiny_hf.py shape) + addition data under root."""
    from rfpo_megatron.rewards.addition import make_split, write_jsonl
    from tiny_assets import VOCAB_SIZE, build_tokenizer

    model_dir, data_dir = os.path.join(root, "model"), os.path.join(root, "data")
    tok = build_tokenizer(model_dir)
    cfg = dict(MOE_HF, vocab_size=VOCAB_SIZE, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    make_tiny_moe(model_dir, cfg, seed=0)
    os.makedirs(data_dir, exist_ok=True)
    train = os.path.join(data_dir, "train.jsonl")
    write_jsonl(train, make_split(8, [1], seed=1, prefix="tr"))
    return {"model": model_dir, "train": train}


@pytest.mark.slow  # ~90 s wall on the shared 2-core box (~27 s CPU): a real trainer subprocess + engine server
def test_trainer_moe_router_replay_rfpo_weight_sync(tmp_path):
    from rfpo_megatron.logging import read_metrics

    assets = _assets(str(tmp_path / "assets"))
    out = str(tmp_path / "run")
    extra = {"actor.router_replay": "rollout", "actor.micro_batch_size": 8, "rollout.colocate": "false",
             "rollout.weight_sync": "tensor", "rollout.max_new_tokens": 6, "algo.max_response_len": 6,
             "data.reward_fn": "first_char_digit", "rfpo.enabled": "true", "rfpo.fix.attempts": 1,
             "algo.tis_cap": 2.0, "trainer.save_interval": 0,
             "logging.wandb_mode": "disabled"}
    p = subprocess.run(run_trainer_cmd([CONFIG, *tiny_overrides(assets, out, **extra)]), env=trainer_env(),
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = read_metrics(os.path.join(out, "logs", "metrics.jsonl"))
    for r in rows:
        print({k: r.get(k) for k in ("step", "train/router_replay_mismatch", "train/moe_aux_loss",
                                     "train/rollout_logprob_gap_max", "train/grad_norm", "rfpo/fix_targets")})
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train/router_replay_mismatch"] == 0.0
        assert 0.0 < r["train/moe_aux_loss"] < 10.0  # megatron's switch loss, 1.0 for perfectly balanced routing
        assert r["train/rollout_logprob_gap_max"] < 1e-4
    assert rows[0]["train/grad_norm"] > 0  # step 2's rollout came from updated (synced) weights
