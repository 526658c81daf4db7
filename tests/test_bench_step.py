"""Smoke test of the step benchmark (`rfpo-megatron bench --step`, tools/bench_step.py): one measured step of a
tiny shape runs through the real trainer and prints the per-stage breakdown. No timing is asserted."""
from __future__ import annotations

import os
import subprocess
import sys

from test_trainer_fixtures import ROOT, trainer_env


def test_bench_step_runs_one_step_and_prints_the_breakdown(tmp_path):
    argv = [sys.executable, "-m", "rfpo_megatron.cli", "bench", "--step", "--hidden", "32", "--layers", "1",
            "--prompts", "2", "--samples", "2", "--max-new-tokens", "4", "--warmup", "0", "--steps", "1",
            "--skip-old-logprob-pass", "auto", "--work-dir", str(tmp_path)]
    p = subprocess.run(argv, env=trainer_env(), capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    out = p.stdout
    for label in ("| rollout |", "generate (engine call)", "| log-prob (old + ref) |", "| train |",
                  "forward+backward", "optimizer", "| weight sync |", "| eval | n/a |", "| step |", "tokens/s",
                  "achieved FLOP/s fraction, train", "measured float32 matmul peak", "skipped=True",
                  "TRL comparison", "plain HF generate", "| rollout / plain HF generate |",
                  "| train / plain PyTorch fwd+bwd+AdamW |", "| weight sync / step |"):
        assert label in out, (label, out)
    assert os.path.isdir(tmp_path)
