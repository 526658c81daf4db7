"""Weight sync modes: pushing HTTP tensors, broadcasting over a trainer->server process group
(rollout.weight_sync=distributed; gloo on CPU, nccl on GPU) and writing an HF safetensors directory that the
engine loads (rollout.weight_sync=disk) leave the engine with the same weights, so the runs' step metrics are
identical (rollouts of steps 2+ are sampled from the synced weights)."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from test_trainer_fixtures import ROOT, build_assets, run_trainer_cmd, tiny_overrides, trainer_env

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")
EXTRA = {"data.reward_fn": "first_char_digit", "data.prompts_per_step": 4, "rollout.n_samples": 4,
         "rfpo.fix.attempts": 2, "rfpo.fix.max_per_group": 2, "trainer.steps": 3, "trainer.save_interval": 0,
         "rollout.colocate": "false", "logging.wandb_mode": "disabled"}


def _run(assets, out, mode, **extra):
    p = subprocess.run(run_trainer_cmd([CONFIG, *tiny_overrides(assets, out, **{**EXTRA, **extra,
                                                                   "rollout.weight_sync": mode})]),
                       env=trainer_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    from rfpo_megatron.logging import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"}
            for r in read_metrics(os.path.join(out, "logs", "metrics.jsonl"))]


@pytest.fixture(scope="module")
def tensor_run(tmp_path_factory):
    """(assets, metrics of the 3-step run with weight_sync=tensor), shared by the mode comparisons."""
    root = tmp_path_factory.mktemp("weight_sync")
    assets = build_assets(str(root / "assets"))
    a = _run(assets, str(root / "tensor"), "tensor")
    assert [r["step"] for r in a] == [1, 2, 3]
    assert any(r["train/grad_norm"] > 0 for r in a[:2])  # the weights really changed before steps 2 and 3
    return assets, a


def test_distributed_sync_equals_tensor_sync(tensor_run, tmp_path):
    assets, a = tensor_run
    assert _run(assets, str(tmp_path / "dist"), "distributed") == a


def test_disk_sync_equals_tensor_sync(tensor_run, tmp_path):
    """weight_sync=disk: same metrics as tensor; the sync directory holds only the last complete HF copy
    (3 syncs, no .tmp left), which transformers loads and which differs from the start weights."""
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM

    assets, a = tensor_run
    sync_dir = str(tmp_path / "shared_fs" / "weights")
    assert _run(assets, str(tmp_path / "disk"), "disk", **{"rollout.weight_sync_dir": sync_dir}) == a
    assert sorted(os.listdir(sync_dir)) == ["sync_000003"]
    last = os.path.join(sync_dir, "sync_000003")
    assert {"config.json", "model.safetensors.index.json"} <= set(os.listdir(last))
    synced = Qwen2ForCausalLM.from_pretrained(last).state_dict()
    start = load_file(os.path.join(assets["model"], "model.safetensors"))
    assert set(start) <= set(synced)
    assert any(not torch.equal(start[k], synced[k]) for k in start)  # the trained weights, not the start ones


# PP 2 + disk is the slow lane's (21 s): disk sync is compared with tensor sync single-process by default
@pytest.mark.parametrize("mode", [pytest.param("disk", marks=pytest.mark.slow), "distributed"])
def test_pp2_torchrun_sync_matches_tensor_sync(tensor_run, tmp_path, mode):
    """Pipeline parallel 2 under `torchrun`. disk: each stage writes its own shard of the one directory (rank 0
    renames it and alone tells the engine). distributed: stage 1's sender relays its buckets to rank 0, the
    update group's only broadcaster (the 72B disaggregated recipe's layout). A missing stage changes steps 2+."""
    import sys

    from rfpo_megatron.rollout.procs import free_port

    assets, a = tensor_run
    out = str(tmp_path / "pp2")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    fixtures = os.path.join(ROOT, "tests", "test_trainer_fixtures.py")
    p = subprocess.run([torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", fixtures, "train", CONFIG,
                        *tiny_overrides(assets, out, **EXTRA, **{"actor.pipeline_model_parallel_size": 2,
                                                                 "rollout.weight_sync": mode})],
                       env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    from rfpo_megatron.logging import read_metrics

    b = [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"}
         for r in read_metrics(os.path.join(out, "logs", "metrics.jsonl"))]
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ra:
            if k.startswith("train/") and k not in ("train/lr", "train/update_skipped"):  # PP reduction order
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)
            else:
                assert rb[k] == ra[k], (ra["step"], k)
    if mode == "disk":
        last = os.path.join(out, "ckpt", "weight_sync", "sync_000003")
        assert sorted(f for f in os.listdir(last) if f.endswith(".safetensors")) == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # one shard per stage


def test_bad_weight_sync_choice_fails_early(monkeypatch):
    from rfpo_megatron import train as T
    from rfpo_megatron.config import ConfigError, load_config

    for key in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    # distributed with PP > 1: stage senders relay to rank 0 (fact 12 of the SGLang issue), no longer refused
    assert T.sync_mode(load_config(CONFIG, ["rollout.weight_sync=distributed", "actor.pipeline_model_parallel_size=2"])) \
        == "distributed"
    assert T.sync_mode(load_config(CONFIG, ["rollout.weight_sync=auto", "rollout.colocate=false"])) == "distributed"
    assert T.sync_mode(load_config(CONFIG, ["rollout.weight_sync=auto"])) == "tensor"
    # colocated across nodes: CUDA-IPC handles cannot leave the node, NCCL cannot pair ranks sharing a GPU -> disk
    sgl = ["rollout.engine=sglang"]
    assert T.sync_mode(load_config(CONFIG, ["rollout.weight_sync=auto", *sgl]), nodes=4) == "disk"
    monkeypatch.setenv("SLURM_NNODES", "8")
    assert T.job_nodes() == 8 and T.sync_mode(load_config(CONFIG, ["rollout.weight_sync=auto", *sgl])) == "disk"
    with pytest.raises(ConfigError, match="weight_sync=tensor on 8 nodes.*CUDA-IPC"):
        T.sync_mode(load_config(CONFIG, ["rollout.weight_sync=tensor", *sgl]))
    monkeypatch.delenv("SLURM_NNODES")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert T.job_nodes() == 2
    disk = load_config(CONFIG, ["rollout.weight_sync=disk", "trainer.save_dir=/x/ckpt",
                                "actor.pipeline_model_parallel_size=2"])
    assert T.sync_mode(disk) == "disk" and T.weight_sync_dir(disk) == "/x/ckpt/weight_sync"
    disk.rollout.weight_sync_dir = "/shared/w"
    assert T.weight_sync_dir(disk) == "/shared/w"
    with pytest.raises(ConfigError, match="rollout.weight_sync"):
        load_config(CONFIG, ["rollout.weight_sync=nfs"])


@pytest.mark.parametrize("release", ["auto", "always"])
def test_colocated_release_policy_keeps_the_run(tensor_run, tmp_path, release):
    """rollout.colocate with the embedded CPU engine: `auto` never releases (nothing to free, ~20 ms a step),
    `always` releases before every update and resumes at the sync (the SGLang path). Either way the run is the
    non-colocated run step for step: the engine ends every sync with the actor's weights. The engine's log
    records each release / resume."""
    import glob

    assets, a = tensor_run
    out = str(tmp_path / release)
    assert _run(assets, out, "tensor", **{"rollout.colocate": "true", "rollout.release_memory": release}) == a
    (log,) = glob.glob(os.path.join(out, "logs", "rollout_logs", "embedded_*.log"))
    text = open(log).read()
    n_rel, n_res = text.count("released memory"), text.count("resumed memory")
    assert (n_rel, n_res) == ((0, 0) if release == "auto" else (3, 6))  # resume: weights, then the other tags


def test_release_policy_resolution():
    from rfpo_megatron.config import ConfigError, load_config
    from rfpo_megatron.train.weight_sync import releases_memory

    def rel(*ov):
        return releases_memory(load_config(CONFIG, list(ov)))

    assert rel("rollout.colocate=true") is False  # the embedded CPU engine the trainer launches
    assert rel("rollout.colocate=true", "rollout.engine=sglang") is True
    assert rel("rollout.colocate=true", "rollout.server_urls=[http://127.0.0.1:1]") is True  # may be SGLang on GPUs
    assert rel("rollout.colocate=true", "rollout.release_memory=always") is True
    assert rel("rollout.colocate=true", "rollout.engine=sglang", "rollout.release_memory=never") is False
    assert rel("rollout.colocate=false", "rollout.release_memory=always") is False
    with pytest.raises(ConfigError, match="rollout.release_memory"):
        load_config(CONFIG, ["rollout.release_memory=sometimes"])
