"""trainer.max_generations: the run stops after the step at which the rollout budget is reached (the equal-budget
baselines of examples/tiny_cpu/compare.py), evaluated and saved like a last step; dynamic-sampling refills count."""
from __future__ import annotations

import os
import subprocess

from test_trainer_fixtures import ROOT, build_assets, run_trainer_cmd, tiny_overrides, trainer_env

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")


def test_budget_stop_with_dynamic_sampling_refills_counted(tmp_path):
    from rfpo_megatron.logging import read_metrics

    assets = build_assets(str(tmp_path / "assets"))
    out = str(tmp_path / "run")
    cap = 30
    overrides = tiny_overrides(assets, out, **{
        "rfpo.enabled": "false", "algo.dynamic_sampling": "true", "data.reward_fn": "even_length",
        "trainer.steps": 20, "trainer.max_generations": cap, "trainer.save_interval": 0,
        "trainer.eval_interval": 0, "logging.wandb_mode": "disabled"})
    p = subprocess.run(run_trainer_cmd([CONFIG, *overrides]), env=trainer_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = read_metrics(os.path.join(out, "logs", "metrics.jsonl"))
    gens = [r["rollout/generations_total"] for r in rows]
    # stops at the first step whose running total reaches the cap, not at trainer.steps
    assert gens[-1] >= cap and all(g < cap for g in gens[:-1]) and len(rows) < 20
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    # refills are generations too: each generation round is 2 prompts x 4 samples
    per_step = [b - a for a, b in zip([0.0] + gens[:-1], gens)]
    rounds = [r["rollout/dynamic_sampling_rounds"] for r in rows]
    assert per_step == [8 * n for n in rounds]
    last = len(rows)
    assert os.path.isdir(os.path.join(out, "ckpt", f"step_{last:06d}"))  # saved like a final step
    assert f"trainer.max_generations={cap} reached at step {last}" in p.stdout + p.stderr
