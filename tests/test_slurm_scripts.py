"""Slurm launch helpers without a cluster: script syntax, the rank wrapper's env mapping, config reads,
and the run checker used by the real Slurm test (good run, missing step, wrong checkpoint, re-run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "slurm"))
import helpers  # noqa: E402


@pytest.mark.parametrize("script", ["common.sh", "task.sh", "rfpo_colocated.sbatch", "rfpo_disaggregated.sbatch",
                                    "test_local_slurm.sh"])
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(REPO / "slurm" / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_task_maps_slurm_vars_to_torch_distributed(tmp_path):
    fake = tmp_path / "fakepy"
    fake.write_text("#!/bin/sh\necho \"ARGS=$*\"; echo RANK=$RANK WORLD=$WORLD_SIZE LOCAL=$LOCAL_RANK "
                    "MASTER=$MASTER_ADDR:$MASTER_PORT\n")
    fake.chmod(0o755)
    env = dict(os.environ, SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="1", SLURM_NTASKS_PER_NODE="8",
               MASTER_ADDR="node01", MASTER_PORT="21234", RFPO_PYTHON=str(fake))
    out = subprocess.run(["bash", str(REPO / "slurm" / "task.sh"), "train", "c.yaml", "a.b=1"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "ARGS=-m rfpo_megatron.cli train c.yaml a.b=1" in out
    assert "RANK=5 WORLD=16 LOCAL=1 MASTER=node01:21234" in out
    env.pop("SLURM_PROCID")
    r = subprocess.run(["bash", str(REPO / "slurm" / "task.sh"), "train"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "srun" in r.stderr


def test_config_get_validates_and_applies_overrides(capsys):
    cfg = str(REPO / "examples" / "qwen2.5-32b" / "config.yaml")
    assert helpers.main(["get", cfg, "rollout.sglang_tp=8", "--", "rollout.engine", "rollout.sglang_tp",
                         "rollout.colocate", "data.train_files"]) == 0
    assert capsys.readouterr().out.split("\n")[:4] == ["sglang", "8", "true", '["/data/dapo-math-17k.jsonl"]']
    with pytest.raises(SystemExit, match="rollout.nope"):
        helpers.main(["get", cfg, "--", "rollout.nope"])


def _run(tmp_path: Path, steps: list[int], latest: int | None, wall: float = 1.0) -> tuple[str, str]:
    log_dir, save_dir = tmp_path / "logs", tmp_path / "ckpt"
    log_dir.mkdir(parents=True, exist_ok=True)
    save_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "metrics.jsonl", "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "wall_time": wall + s, "train/loss": 0.5, "rollout/reward_mean": 0.1}) + "\n")
    if latest is not None:
        (save_dir / f"step_{latest:06d}").mkdir(exist_ok=True)
        (save_dir / f"step_{latest:06d}" / "trainer_state.pt").write_bytes(b"x")
        (save_dir / "latest").write_text(f"step_{latest:06d}\n")
    return str(log_dir), str(save_dir)


def test_check_run_accepts_a_good_run_and_a_real_resume(tmp_path):
    log_dir, save_dir = _run(tmp_path, [1, 2], 2)
    assert helpers.check_run(log_dir, save_dir, 2) == []
    snap = tmp_path / "snap.jsonl"
    snap.write_text(Path(log_dir, "metrics.jsonl").read_text())
    (Path(save_dir) / "step_000003").mkdir()  # the resumed job: one more checkpoint, step 3 appended
    (Path(save_dir) / "step_000003" / "trainer_state.pt").write_bytes(b"x")
    (Path(save_dir) / "latest").write_text("step_000003\n")
    with open(Path(log_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "wall_time": 9.0, "train/loss": 0.4}) + "\n")
    assert helpers.check_run(log_dir, save_dir, 3, str(snap), 2) == []


def test_check_run_catches_each_failure(tmp_path):
    log_dir, save_dir = _run(tmp_path / "a", [1, 3], 3)
    assert any("steps are [1, 3]" in p for p in helpers.check_run(log_dir, save_dir, 3))
    log_dir, save_dir = _run(tmp_path / "b", [1, 2], 1)
    assert any("expected step_000002" in p for p in helpers.check_run(log_dir, save_dir, 2))
    log_dir, save_dir = _run(tmp_path / "c", [1, 2], None)
    assert any("no checkpoint" in p for p in helpers.check_run(log_dir, save_dir, 2))
    # a "resumed" job that actually re-ran steps 1..2 from scratch: rewritten records (new wall_time)
    log_dir, save_dir = _run(tmp_path / "d", [1, 2], 2, wall=1.0)
    snap = tmp_path / "d" / "snap.jsonl"
    snap.write_text(Path(log_dir, "metrics.jsonl").read_text())
    log_dir, save_dir = _run(tmp_path / "d", [1, 2, 3], 3, wall=50.0)
    assert any("re-ran from scratch" in p for p in helpers.check_run(log_dir, save_dir, 3, str(snap), 2))
