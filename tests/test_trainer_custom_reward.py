"""Acceptance (issue 17): a reward function in a user file outside the package trains the tiny demo model for 3
steps, and its messages reach the `error_info` fix prompts. A real `rfpo-megatron train` subprocess; the fix
prompts are recorded by wrapping `render_fix_prompt` (its output is passed on unchanged)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from test_trainer_fixtures import ROOT, build_assets, tiny_overrides, trainer_env

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")
USER_REWARD = '''

def score(response_text, answer, record, marker="USERMSG"):
    ok = bool(response_text) and response_text[0].isdigit()
    return (1.0, "") if ok else (0.0, f"{marker}: the first character of the answer to {record['id']} is not a digit")
'''
DRIVER = '''
import json, sys
import rfpo_megatron.fix.stage as stage
real = stage.render_fix_prompt
def recording(*a, **kw):
    text = real(*a, **kw)
    with open(sys.argv[1], "a") as fh:
        fh.write(json.dumps(text) + "\\n")
    return text
stage.render_fix_prompt = recording
from rfpo_megatron.trainer import main
sys.exit(main(sys.argv[2:]))
'''


def test_user_file_reward_trains_three_steps_and_feeds_error_info(tmp_path):
    from rfpo_megatron.logging import read_metrics

    assets = build_assets(str(tmp_path / "assets"))
    reward_file = tmp_path / "elsewhere" / "my_verifier.py"
    reward_file.parent.mkdir()
    reward_file.write_text(USER_REWARD)
    prompts_log = tmp_path / "fix_prompts.jsonl"
    out = str(tmp_path / "run")
    overrides = tiny_overrides(assets, out, **{
        "data.reward_fn": f"{reward_file}:score", "data.reward_kwargs": "{marker: FROM_USER_FILE}",
        "rfpo.fix.variant": "error_info", "trainer.steps": 3, "trainer.save_interval": 0,
        "logging.wandb_mode": "disabled"})
    p = subprocess.run([sys.executable, "-c", DRIVER, str(prompts_log), CONFIG, *overrides], env=trainer_env(),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = read_metrics(os.path.join(out, "logs", "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/reward_errors"] == 0.0 for r in rows)
    prompts = [json.loads(line) for line in prompts_log.read_text().splitlines()]
    assert prompts, "no error_info fix prompt was rendered"
    assert all("FROM_USER_FILE: the first character of the answer to tr" in t for t in prompts), prompts[:2]
