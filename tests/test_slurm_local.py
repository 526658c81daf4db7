"""Real single-node Slurm: slurmctld + slurmd + munged on localhost; a smoke job, the watchdog on a hanging
2-rank step, the project's sbatch script with the tiny CPU config (2 tasks over gloo) + a resume job, and a
job interrupted by requeue (preemption) and by the pre-time-limit USR2 that must checkpoint, restart and
resume (slurm/test_local_slurm.sh all; excluded from the default run).

Needs root (apt-get install slurm-wlm munge, the munge user) unless Slurm is already installed; takes minutes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slurm


def _can_run() -> str:
    if os.geteuid() != 0 and not shutil.which("slurmctld"):
        return "needs root to install slurm-wlm/munge (or preinstalled Slurm)"
    if not (REPO / "rfpo_megatron" / "trainer.py").exists():
        return "the trainer is missing"
    return ""


@pytest.mark.timeout(2400)
def test_sbatch_tiny_cpu_train_then_resume(tmp_path):
    why = _can_run()
    if why:
        pytest.skip(why)
    env = dict(os.environ, RFPO_SLURM_STATE=str(tmp_path / "slurm"), RFPO_SLURM_TIMEOUT="1200")
    r = subprocess.run(["bash", str(REPO / "slurm" / "test_local_slurm.sh"), "all"], env=env, capture_output=True,
                       text=True, timeout=2300)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    for phase in ("smoke OK", "watchdog OK", "train + resume OK", "requeue OK", "usr2 OK", "ALL OK"):
        assert f"[test_local_slurm] {phase}" in r.stderr, (phase, tail)
    # the daemons it started are gone
    for name in ("slurmctld.pid", "slurmd.pid"):
        assert not (tmp_path / "slurm" / name).exists()
