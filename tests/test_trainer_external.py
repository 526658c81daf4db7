"""The trainer against already-running servers (rollout.server_urls + rollout.router_url, the Slurm multi-node
path): two embedded servers started here (not by the trainer) behind the real sglang_router 0.3.2. The 3-step
run equals the same run with the engine the trainer launches itself (rollouts of steps 2+ are sampled from
weights synced to both servers), generation goes through the router to both servers, weight sync goes to each
server directly, and the servers outlive the trainer (they are not the trainer's to stop)."""
from __future__ import annotations

import os
import subprocess
import time

import pytest
import requests

from test_trainer_fixtures import ROOT, build_assets, run_trainer_cmd, tiny_overrides, trainer_env

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")
EXTRA = {"data.reward_fn": "first_char_digit", "data.prompts_per_step": 4, "rollout.n_samples": 4,
         "rfpo.fix.attempts": 2, "rfpo.fix.max_per_group": 2, "trainer.steps": 3, "trainer.save_interval": 0,
         "rollout.colocate": "false", "logging.wandb_mode": "disabled"}


def _run(assets, out, **extra):
    p = subprocess.run(run_trainer_cmd([CONFIG, *tiny_overrides(assets, out, **{**EXTRA, **extra})]),
                       env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    from rfpo_megatron.logging import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"}
            for r in read_metrics(os.path.join(out, "logs", "metrics.jsonl"))]


def _start_router(workers: list[str], log_dir: str):
    """The real sglang_router in front of `workers`, launched with the project's router command line
    (loopback Prometheus port, /get_model_info health check); health checks every second, so a check that
    generated would hit the servers while the colocated trainer has their memory released."""
    from rfpo_megatron.rollout.procs import free_port, spawn, wait_healthy
    from rfpo_megatron.rollout.sglang import build_router_cmd

    port = free_port()
    cmd = build_router_cmd(workers, "127.0.0.1", port, {"health_check_interval_secs": 1}, request_timeout_s=300)
    proc = spawn("sglang-router", cmd, os.path.join(log_dir, "router.log"), env=trainer_env(),
                 url=f"http://127.0.0.1:{port}")
    try:
        wait_healthy(proc.url, proc, 120, path="/health")
    except BaseException:
        proc.stop()
        raise
    return proc


def test_trainer_on_two_servers_behind_the_real_router_equals_launched_engine(tmp_path):
    from rfpo_megatron.rollout.launch import launch_embedded_server

    assets = build_assets(str(tmp_path / "assets"))
    servers = [launch_embedded_server(assets["model"], log_dir=str(tmp_path / f"server{k}"), env=trainer_env(),
                                      threads=1, startup_timeout_s=120) for k in range(2)]
    urls = [s.worker_urls[0] for s in servers]
    procs = [s.processes[0] for s in servers]
    router = _start_router(urls, str(tmp_path))
    try:
        before = [requests.get(u + "/get_server_info", timeout=10).json() for u in urls]
        ext = _run(assets, str(tmp_path / "external"), **{"rollout.server_urls": f"[{urls[0]},{urls[1]}]",
                                                          "rollout.router_url": router.url, "rollout.colocate": "true"})
        after = [requests.get(u + "/get_server_info", timeout=10).json() for u in urls]
        assert router.alive() and all(p.alive() for p in procs), "the trainer stopped processes it did not start"
        # both servers generated (the router spread the one-item requests), both got every weight update
        assert all(a["progress"] > b["progress"] for a, b in zip(after, before)), (before, after)
        assert after[0]["weight_version"] == after[1]["weight_version"]
        # the router's checks never generated on released memory (colocated: memory released while training)
        assert [a["health_while_released"] for a in after] == [0, 0]
        assert all(a["released"] == [] and not a["weight_update_session"] for a in after)
        assert not list((tmp_path / "external" / "logs").glob("rollout_logs/embedded_*.log"))  # nothing launched
        log = open(os.path.join(tmp_path, "router.log")).read()
        assert "/generate" in log and "update_weights" not in log  # weight updates bypass the router
    finally:
        router.stop()
        for p in procs:
            p.stop()
    time.sleep(0.5)
    assert not router.alive() and not any(p.alive() for p in procs)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    left = [ln for ln in ps.splitlines() if str(tmp_path) in ln or f"--port {router.url.rsplit(':', 1)[1]}" in ln]
    assert not left, left
    for u in urls:
        with pytest.raises(requests.ConnectionError):
            requests.get(u + "/health", timeout=5)

    own = _run(assets, str(tmp_path / "launched"))
    assert [r["step"] for r in own] == [1, 2, 3]
    assert any(r["train/grad_norm"] > 0 for r in own[:2])  # the weights changed before steps 2 and 3
    assert list((tmp_path / "launched" / "logs").glob("rollout_logs/embedded_*.log"))  # this one launched its own
    assert ext == own


def test_router_url_without_server_urls_is_a_config_error():
    from rfpo_megatron.config import ConfigError, load_config
    from rfpo_megatron.train.lifecycle import engine_config

    with pytest.raises(ConfigError, match=r"rollout\.router_url.*rollout\.server_urls") as e:
        load_config(CONFIG, ["rollout.router_url=http://r:1"])
    assert "\n" not in str(e.value)
    cfg = load_config(CONFIG, ["rollout.router_url=http://r:1", "rollout.server_urls=[http://a:2,http://b:3]"])
    ec = engine_config(cfg)
    assert (ec["backend"], ec["router_url"], ec["urls"]) == ("external", "http://r:1", ["http://a:2", "http://b:3"])
    ec = engine_config(load_config(CONFIG, ["rollout.server_urls=[http://a:2]"]))
    assert (ec["backend"], ec["router_url"]) == ("external", None)  # no router: round-robin over the servers


@pytest.mark.parametrize("router", ["http://node1:20199", ""])
def test_slurm_urls_override_reaches_the_trainer_config(tmp_path, router):
    """slurm/common.sh rfpo_urls_override prints one override per line; the sbatch scripts read them into an
    array (mapfile), so server_urls and router_url arrive as separate arguments and load into the config."""
    script = ('source slurm/common.sh; RFPO_SGLANG_URLS="http://node1:20100 http://node2:20100"; '
              'if [ -n "$R" ]; then export RFPO_ROUTER_URL="$R"; else unset RFPO_ROUTER_URL; fi; '
              'EXTRA=(a.b=1); mapfile -t -O "${#EXTRA[@]}" EXTRA < <(rfpo_urls_override); printf "%s\\n" "${EXTRA[@]}"')
    env = dict(os.environ, RFPO_REPO=ROOT, RFPO_CONFIG="examples/tiny_cpu/config.yaml", RFPO_RUN_DIR=str(tmp_path),
               R=router)
    out = subprocess.run(["bash", "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    args = out.stdout.splitlines()
    urls = "rollout.server_urls=[http://node1:20100,http://node2:20100]"
    assert args == ["a.b=1", urls] + ([f"rollout.router_url={router}"] if router else [])

    from rfpo_megatron.config import load_config

    cfg = load_config(CONFIG, args[1:])
    assert cfg.rollout.server_urls == ["http://node1:20100", "http://node2:20100"]
    assert cfg.rollout.router_url == (router or None)
