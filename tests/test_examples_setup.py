"""Every shipped example config loads and passes the trainer's set-up validation that needs no GPU and no model
files: config validation, the weight-sync mode on the recipe's node count (from its `sbatch -N` line), the
rollout engine settings (server args that contradict the rollout section are refused) and the reward name."""
from __future__ import annotations

import glob
import os
import re

import pytest

from rfpo_megatron.config import load_config
from rfpo_megatron.rewards import available_rewards
from rfpo_megatron.train import engine_config, sync_mode
from rfpo_megatron.train.lifecycle import validate_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*", "config*.yaml")))


def _train_nodes(path: str) -> int:
    """Nodes the actor runs on: `sbatch -N n` minus RFPO_ROLLOUT_NODES (disaggregated), 1 without a launch line."""
    text = open(path).read()
    m = re.search(r"sbatch -N (\d+)", text)
    nodes = int(m.group(1)) if m else 1
    r = re.search(r"RFPO_ROLLOUT_NODES=(\d+)", text)
    return nodes - (int(r.group(1)) if r else 0)


def test_every_example_is_covered():
    assert len(EXAMPLES) >= 5 and any("tiny_cpu" in p for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: os.path.relpath(p, ROOT))
def test_example_passes_setup_validation(path):
    cfg = load_config(path)
    validate_setup(cfg, check_files=False)  # the trainer's own checks (model and data paths exist only on the cluster)
    nodes = _train_nodes(path)
    mode = sync_mode(cfg, nodes=nodes)
    if cfg.rollout.engine == "sglang" and cfg.rollout.colocate:
        assert mode == ("tensor" if nodes == 1 else "disk"), (nodes, mode)  # CUDA IPC stays on its node
    ec = engine_config(cfg)
    if cfg.rollout.engine == "sglang":
        args = ec["server_args"]
        assert args["mem_fraction_static"] == cfg.rollout.mem_fraction_static
        assert bool(args.get("enable_memory_saver")) is bool(cfg.rollout.colocate)
    from rfpo_megatron.rewards.custom import is_path_spec

    assert cfg.data.reward_fn in available_rewards() or is_path_spec(cfg.data.reward_fn)


def test_server_args_contradicting_the_rollout_section_are_refused():
    from rfpo_megatron.config import ConfigError

    path = os.path.join(ROOT, "examples", "qwen2.5-7b", "config.yaml")
    with pytest.raises(ConfigError, match="rollout.server_args.mem_fraction_static=0.5 contradicts"):
        engine_config(load_config(path, ["rollout.server_args={mem_fraction_static: 0.5}"]))
    ok = engine_config(load_config(path, ["rollout.deterministic_inference=true"]))["server_args"]
    assert ok["enable_deterministic_inference"] is True
