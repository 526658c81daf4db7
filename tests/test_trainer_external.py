"""The trainer against already-running servers (rollout.server_urls + rollout.router_url, the Slurm multi-node
path): an embedded server started here (not by the trainer) behind a tiny counting HTTP proxy standing in for
sglang_router. The 3-step run equals the same run with the engine the trainer launches itself (rollouts of
steps 2+ are sampled from weights synced to the external server), generation goes through the router, weight
sync goes to the server directly, and the server outlives the trainer (it is not the trainer's to stop)."""
from __future__ import annotations

import os
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from test_trainer_fixtures import ROOT, build_assets, run_trainer_cmd, tiny_overrides, trainer_env

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")
EXTRA = {"data.reward_fn": "first_char_digit", "data.prompts_per_step": 4, "rollout.n_samples": 4,
         "rfpo.fix.attempts": 2, "rfpo.fix.max_per_group": 2, "trainer.steps": 3, "trainer.save_interval": 0,
         "rollout.colocate": "false", "logging.wandb_mode": "disabled"}


def _run(assets, out, **extra):
    p = subprocess.run(run_trainer_cmd([CONFIG, *tiny_overrides(assets, out, **EXTRA, **extra)]),
                       env=trainer_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    from rfpo_megatron.logging import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"}
            for r in read_metrics(os.path.join(out, "logs", "metrics.jsonl"))]


class _Router:
    """Forwards every request to one server and counts (method, path): a stand-in for sglang_router."""

    def __init__(self, target: str):
        self.seen: Counter = Counter()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                outer.seen[(self.command, self.path)] += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
                req = urllib.request.Request(target + self.path, data=body, method=self.command,
                                             headers={"Content-Type": self.headers.get("Content-Type", "application/json")})
                try:
                    with urllib.request.urlopen(req, timeout=600) as r:
                        status, data, ctype = r.status, r.read(), r.headers.get("Content-Type", "application/json")
                except urllib.error.HTTPError as e:
                    status, data, ctype = e.code, e.read(), e.headers.get("Content-Type", "text/plain")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_trainer_on_external_server_behind_router_equals_launched_engine(tmp_path):
    from rfpo_megatron.rollout.launch import launch_embedded_server

    assets = build_assets(str(tmp_path / "assets"))
    server = launch_embedded_server(assets["model"], log_dir=str(tmp_path / "server_logs"), env=trainer_env(),
                                    threads=1, startup_timeout_s=120)
    (proc,), url = server.processes, server.worker_urls[0]
    router = _Router(url)
    try:
        ext = _run(assets, str(tmp_path / "external"),
                   **{"rollout.server_urls": f"[{url}]", "rollout.router_url": router.url})
        # the trainer exited and left the server it did not start running, with its trained weights
        assert proc.alive(), "the trainer stopped an external server"
        assert requests.get(url + "/health", timeout=10).status_code == 200
        gen = router.seen[("POST", "/generate")]
        assert gen >= 3, router.seen  # every step's rollouts went through the router ...
        assert not [k for k in router.seen if "weight" in k[1]], router.seen  # ... weight updates did not
        assert not list((tmp_path / "external" / "logs").glob("rollout_logs/embedded_*.log"))  # nothing launched
    finally:
        router.close()
        server.processes = []  # the client only wraps it; stop it explicitly below and check it went
        proc.stop()
    assert not proc.alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=5)

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
