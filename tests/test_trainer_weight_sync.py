"""Weight sync modes: pushing HTTP tensors and broadcasting over a trainer->server process group
(rollout.weight_sync=distributed; gloo on CPU, nccl on GPU) leave the engine with the same weights, so the
runs' step metrics are identical (rollouts of steps 2+ are sampled from the synced weights)."""
from __future__ import annotations

import os
import subprocess

import pytest

from test_trainer_fixtures import ROOT, build_assets, run_trainer_cmd, tiny_overrides, trainer_env

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")
EXTRA = {"data.reward_fn": "first_char_digit", "data.prompts_per_step": 4, "rollout.n_samples": 4,
         "rfpo.fix.attempts": 2, "rfpo.fix.max_per_group": 2, "trainer.steps": 3, "trainer.save_interval": 0,
         "rollout.colocate": "false", "logging.wandb_mode": "disabled"}


def _run(assets, out, mode):
    p = subprocess.run(run_trainer_cmd([CONFIG, *tiny_overrides(assets, out, **EXTRA, **{"rollout.weight_sync": mode})]),
                       env=trainer_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    from rfpo_megatron.logging import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"}
            for r in read_metrics(os.path.join(out, "logs", "metrics.jsonl"))]


def test_distributed_sync_equals_tensor_sync(tmp_path):
    assets = build_assets(str(tmp_path / "assets"))
    a = _run(assets, str(tmp_path / "tensor"), "tensor")
    b = _run(assets, str(tmp_path / "dist"), "distributed")
    assert [r["step"] for r in a] == [1, 2, 3]
    assert any(r["train/grad_norm"] > 0 for r in a[:2])  # the weights really changed before steps 2 and 3
    assert a == b


def test_bad_weight_sync_choice_fails_early():
    from rfpo_megatron import train as T
    from rfpo_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="pipeline_model_parallel_size=1"):
        T.sync_mode(load_config(CONFIG, ["rollout.weight_sync=distributed", "actor.pipeline_model_parallel_size=2"]))
    assert T.sync_mode(load_config(CONFIG, ["rollout.weight_sync=auto", "rollout.colocate=false"])) == "distributed"
    assert T.sync_mode(load_config(CONFIG, ["rollout.weight_sync=auto"])) == "tensor"
