"""Remote reward service (`data.reward_url`): real server processes on loopback, the reference one
(`rfpo-megatron reward-server`) and misbehaving ones (tests/reward_server_faults.py: stall, 500s, death
mid-batch). Checks: the same rewards as in-process, failure within the timeout x attempts bound naming the URL
(policy raise) or zero scores counted (policy zero), and no thread or process left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest

from rfpo_megatron.config import load_config
from rfpo_megatron.rewards import build_reward
from rfpo_megatron.rewards.addition import addition_solution
from rfpo_megatron.rewards.guard import ERROR_MESSAGE, RewardError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = os.path.join(ROOT, "tests", "reward_server_faults.py")


def _start(cmd: list[str], marker: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if marker in line:
            if "http://" in line:  # "reward server: http://127.0.0.1:PORT/score (reward_fn ...)"
                return p, int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
            return p, int(line.split()[-1])  # "listening on PORT"
        if p.poll() is not None:
            raise RuntimeError(f"server exited: {p.stderr.read()[-2000:]}")
    p.kill()
    raise RuntimeError("server did not start within 60 s")


@pytest.fixture()
def server():
    procs = []

    def start(cmd, marker):
        p, port = _start(cmd, marker)
        procs.append(p)
        SERVER_PIDS.add(p.pid)
        return p, port

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def _remote(port, *overrides, path=""):
    cfg = load_config(None, [f"data.reward_url=http://127.0.0.1:{port}{path}", *overrides])
    return build_reward(cfg.data)


def _items(n):
    out = []
    for i in range(n):
        a, b = 10 + 7 * i, 25 + 3 * i
        text = addition_solution(a, b) if i % 2 == 0 else f"ans={a + b + 1}"
        out.append((text, str(a + b), {"id": f"q{i}", "prompt": f"{a}+{b}", "answer": str(a + b), "a": a, "b": b}))
    return out


SERVER_PIDS: set[int] = set()


def _threads_and_children():
    """Live threads, and child processes other than the servers the test started."""
    return threading.active_count(), {c.pid for c in psutil.Process().children(recursive=True)} - SERVER_PIDS


def test_reference_server_matches_in_process(server):
    proc, port = server([sys.executable, "-m", "rfpo_megatron.cli", "reward-server", "--reward-fn", "addition",
                         "--port", "0"], "reward server:")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        assert json.loads(r.read()) == {"ok": True, "reward_fn": "addition"}
    items = _items(7)
    local = build_reward(load_config(None, ["data.reward_fn=addition"]).data).score_batch(items)
    before = _threads_and_children()
    remote = _remote(port, "data.reward_url_batch_size=3", "data.reward_url_concurrency=2", path="/score")
    got = remote.score_batch(items)
    assert [(r.reward, r.message) for r in got] == [(r.reward, r.message) for r in local]
    assert [r.reward for r in got] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # right solutions at even i
    assert _threads_and_children() == before


def test_reference_server_reports_item_errors_under_the_policy(server, tmp_path):
    f = tmp_path / "user_reward.py"
    f.write_text("def score(response_text, answer, record):\n"
                 "    if record['id'] == 'q1':\n        raise KeyError('no such field')\n"
                 "    return 1.0, 'fine'\n")
    proc, port = server([sys.executable, "-m", "rfpo_megatron.cli", "reward-server", "--reward-fn",
                         f"{f}:score", "--port", "0"], "reward server:")
    with pytest.raises(RewardError) as e:
        _remote(port).score_batch(_items(3))
    assert f"http://127.0.0.1:{port}" in str(e.value) and "'q1'" in str(e.value) and "KeyError" in str(e.value)
    v = _remote(port, "data.reward_error_policy=zero")
    out = v.score_batch(_items(3))
    assert [(r.reward, r.message) for r in out] == [(1.0, "fine"), (0.0, ERROR_MESSAGE), (1.0, "fine")]
    assert v.pop_errors() == 1


def _hits(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/hits", timeout=10) as r:
        return json.loads(r.read())["hits"]


def test_stalling_server_fails_within_timeout_times_attempts(server):
    proc, port = server([sys.executable, FAULTS, "stall"], "listening on")
    knobs = ["data.reward_url_timeout_s=1", "data.reward_url_attempts=2", "data.reward_url_backoff_s=0.1"]
    before = _threads_and_children()
    t0 = time.monotonic()
    with pytest.raises(RewardError) as e:
        _remote(port, *knobs).score_batch(_items(2))
    took = time.monotonic() - t0
    bound = 1 * 2 + 0.1  # timeout x attempts + the one backoff
    assert 2.0 <= took <= bound + 1.5, took
    msg = str(e.value)
    assert f"POST http://127.0.0.1:{port} failed after 2 attempt(s): timed out after 1s" in msg and "'q0'" in msg
    assert _hits(port) == 2
    v = _remote(port, *knobs, "data.reward_error_policy=zero")
    t0 = time.monotonic()
    out = v.score_batch(_items(2))
    assert time.monotonic() - t0 <= bound + 1.5
    assert [r.reward for r in out] == [0.0, 0.0] and v.pop_errors() == 2
    assert _threads_and_children() == before


def test_500s_are_retried_then_fail(server):
    proc, port = server([sys.executable, FAULTS, "error500"], "listening on")
    with pytest.raises(RewardError, match=r"failed after 3 attempt\(s\): HTTP 500"):
        _remote(port, "data.reward_url_backoff_s=0.05").score_batch(_items(1))
    assert _hits(port) == 3
    proc2, port2 = server([sys.executable, FAULTS, "flaky500", "2"], "listening on")
    out = _remote(port2, "data.reward_url_backoff_s=0.05").score_batch([("abcd", "", {"id": "x"})])
    assert [(r.reward, r.message) for r in out] == [(4.0, "len")] and _hits(port2) == 3


def test_server_dying_mid_batch(server):
    proc, port = server([sys.executable, FAULTS, "die", "1"], "listening on")
    before = _threads_and_children()
    items = [("a", "", {"id": "i0"}), ("bb", "", {"id": "i1"}), ("ccc", "", {"id": "i2"}), ("dddd", "", {"id": "i3"})]
    v = _remote(port, "data.reward_url_batch_size=2", "data.reward_url_concurrency=1",
                "data.reward_url_backoff_s=0.05", "data.reward_error_policy=zero", "data.reward_url_timeout_s=5")
    out = v.score_batch(items)
    assert [r.reward for r in out] == [1.0, 2.0, 0.0, 0.0] and v.pop_errors() == 2
    assert proc.wait(timeout=10) == 1  # it really died
    with pytest.raises(RewardError, match=f"POST http://127.0.0.1:{port} failed after 3 attempt"):
        _remote(port, "data.reward_url_backoff_s=0.05").score_batch(items[:1])
    assert _threads_and_children() == before
