"""The scale recipes: valid configs, layouts that add up to the GPUs their sbatch line asks for, plans that fit
and are current (plan*.txt is the planner's output for the config, byte for byte)."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from rfpo_megatron.config import load_config
from rfpo_megatron.plan import main as plan_main

REPO = Path(__file__).resolve().parents[1]
RECIPES = [
    ("qwen2.5-7b", "config.yaml", "plan.txt"),
    ("qwen2.5-32b", "config.yaml", "plan.txt"),
    ("qwen2.5-72b", "config.yaml", "plan.txt"),
    ("qwen2.5-72b", "config_disaggregated.yaml", "plan_disaggregated.txt"),
    ("qwen3-30b-a3b", "config.yaml", "plan.txt"),
    ("qwen3-30b-a3b", "config_disaggregated.yaml", "plan_disaggregated.txt"),
]


def _plan_output(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert plan_main(argv) == 0
    return buf.getvalue()


@pytest.mark.parametrize("name,cfg,plan", RECIPES)
def test_recipe_is_valid_fits_and_plan_is_current(name, cfg, plan, monkeypatch):
    monkeypatch.chdir(REPO)
    d = REPO / "examples" / name
    text = (d / cfg).read_text()
    lines = (d / plan).read_text().splitlines(keepends=True)
    assert lines[0].startswith("$ rfpo-megatron plan ")
    argv = shlex.split(lines[0][len("$ rfpo-megatron plan "):])
    assert f"examples/{name}/{cfg}" in argv, "the plan must be computed from this config"
    assert _plan_output(argv) == "".join(lines[1:]), f"{plan} is stale: regenerate it with the command on its first line"
    assert "H100 80GB: FITS" in lines[-1]
    c = load_config(str(d / cfg))  # the trainer's own validation
    # the GPUs the sbatch line asks for == the actor's world (+ rollout nodes when disaggregated)
    nodes = int(re.search(r"sbatch -N (\d+)", text).group(1))
    rollout_nodes = int(m.group(1)) if (m := re.search(r"RFPO_ROLLOUT_NODES=(\d+)", text)) else 0
    dp = int(argv[argv.index("--dp") + 1])
    a = c.actor
    world = a.tensor_model_parallel_size * a.pipeline_model_parallel_size * a.context_parallel_size * dp
    assert world == 8 * (nodes - rollout_nodes)
    assert (rollout_nodes > 0) == (not c.rollout.colocate)
    assert f"TP={a.tensor_model_parallel_size} PP={a.pipeline_model_parallel_size}" in lines[1]
    assert c.rollout.engine == "sglang" and 8 % c.rollout.sglang_tp == 0
    assert c.algo.max_response_len == c.rollout.max_new_tokens
    assert c.rfpo.enabled and c.actor.bf16
