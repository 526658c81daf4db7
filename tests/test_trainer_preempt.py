"""Preemption as Slurm does it: SIGTERM reaches every process of the job step, the trainer's own rollout server
too. The server dies at once, so its connection errors can reach rank 0 before rank 0's own signal does; the
trainer must take them as the job stopping (train/runtime.stopping_error), write its checkpoint and exit 0
(the CI failure of 2026-12-02: rank 0 died of the engine error in step 3's rollout, rank 1 of the lost peer)."""
from __future__ import annotations

import os
import subprocess
import sys

from test_trainer_fixtures import ROOT, build_assets, run_trainer_cmd, tiny_overrides, trainer_env

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")
FIXTURES = os.path.join(ROOT, "tests", "test_trainer_fixtures.py")
EXTRA = {"data.reward_fn": "first_char_digit", "data.prompts_per_step": 4, "rollout.n_samples": 4,
         "trainer.steps": 3, "trainer.save_interval": 1}


def _latest(out: str) -> str:
    with open(os.path.join(out, "ckpt", "latest")) as fh:
        return fh.read().strip()


def _steps(out: str) -> list[int]:
    from rfpo_megatron.logging import read_metrics

    return [int(r["step"]) for r in read_metrics(os.path.join(out, "logs", "metrics.jsonl"))]


def test_server_stopped_before_rank0_in_the_rollout_of_two_ranks(tmp_path):
    from rfpo_megatron.rollout.procs import free_port

    assets, out = build_assets(str(tmp_path / "assets")), str(tmp_path / "run")
    env = {**trainer_env(), "RFPO_TEST_ENGINE_STOPS": "rollout:2"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    p = subprocess.run([torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", FIXTURES, "train", CONFIG,
                        *tiny_overrides(assets, out, **EXTRA)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "taken as the job stopping" in p.stdout, p.stdout[-3000:]
    assert "SIGTERM during step 2: saved the checkpoint of step 1" in p.stdout, p.stdout[-3000:]
    assert _latest(out) == "step_000001" and _steps(out) == [1]


def test_server_stopped_before_rank0_in_the_weight_sync(tmp_path):
    assets, out = build_assets(str(tmp_path / "assets")), str(tmp_path / "run")
    env = {**trainer_env(), "RFPO_TEST_ENGINE_STOPS": "sync:2"}
    p = subprocess.run(run_trainer_cmd([CONFIG, *tiny_overrides(assets, out, **EXTRA)]), env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "taken as the job stopping" in p.stdout, p.stdout[-3000:]
    assert "SIGTERM: saved checkpoint at step 2" in p.stdout, p.stdout[-3000:]  # the update ran: step 2 is kept
    assert _latest(out) == "step_000002" and _steps(out) == [1, 2]
    p = subprocess.run(run_trainer_cmd([CONFIG, *tiny_overrides(assets, out, **EXTRA), "--resume"]),
                       env=trainer_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "(step 2)" in p.stdout and _steps(out) == [1, 2, 3]
