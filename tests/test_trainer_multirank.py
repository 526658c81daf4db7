"""The trainer as an SPMD job: `torchrun --nproc_per_node 2` with pipeline parallel 2 over gloo (rank 0 drives
the engine, both stages push their own layers in the weight sync) gives exactly the single-process run's
step metrics (rollouts depend on the synced weights, so a missed stage would change steps 2+)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_trainer_fixtures import ROOT, build_assets, tiny_overrides, trainer_env

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")
FIXTURES = os.path.join(ROOT, "tests", "test_trainer_fixtures.py")
EXTRA = {"data.reward_fn": "first_char_digit", "data.prompts_per_step": 4, "rollout.n_samples": 4,
         "rfpo.fix.attempts": 2, "rfpo.fix.max_per_group": 2, "trainer.steps": 3, "trainer.save_interval": 0}


def _metrics(out):
    from rfpo_megatron.logging import read_metrics

    recs = read_metrics(os.path.join(out, "logs", "metrics.jsonl"))
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"} for r in recs]


def test_pp2_torchrun_matches_single_process(tmp_path):
    from rfpo_megatron.rollout.procs import free_port

    assets = build_assets(str(tmp_path / "assets"))
    single, pp2 = str(tmp_path / "single"), str(tmp_path / "pp2")
    env = trainer_env()
    p = subprocess.run([sys.executable, FIXTURES, "train", CONFIG, *tiny_overrides(assets, single, **EXTRA)],
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    p = subprocess.run([torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", FIXTURES, "train", CONFIG,
                        *tiny_overrides(assets, pp2, **EXTRA, **{"actor.pipeline_model_parallel_size": 2})],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    a, b = _metrics(single), _metrics(pp2)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert any(r["rfpo/fixed_seq_frac"] > 0 for r in a), "the comparison should include a fixed sample"
    for ra, rb in zip(a, b):
        for k in ra:
            if k.startswith("train/") and k not in ("train/lr", "train/update_skipped"):
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)
            else:
                assert rb[k] == ra[k], (ra["step"], k)
