"""Rollout server robustness over real processes: watchdog on a stalled server, server killed
mid-request, unreachable address, startup failure, and no orphan servers after the trainer exits
(exception, SIGTERM, SIGKILL)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from rfpo_megatron.rollout import (EngineClient, EngineConnectionError, EngineTimeoutError, SamplingParams,
                                   launch_embedded_server)
from rfpo_megatron.rollout.procs import free_port, running_processes, spawn
from tiny_hf import make_tiny_hf_model

LONG = SamplingParams(n=4, max_new_tokens=900, ignore_eos=True, seed=0)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("procs_model") / "m", seed=3)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    c = launch_embedded_server(str(model_dir), log_dir=tmp_path_factory.mktemp("logs"), extra_args=["--log-every-s", "0.05"],
                               watchdog_s=1.5, retries=2, backoff_s=0.1)
    yield c
    c.shutdown()


def _when_generating(client: EngineClient, action) -> threading.Thread:
    """Run `action` from a thread once the server has decoded a few steps."""
    def run():
        start = client.server_info()["progress"]
        deadline = time.time() + 30
        while client.server_info()["progress"] < start + 5 and time.time() < deadline:
            time.sleep(0.01)
        action()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_watchdog_reports_stalled_server_with_log_tail(server):
    pid = server.processes[0].pid
    th = _when_generating(server, lambda: os.kill(pid, signal.SIGSTOP))
    t0 = time.time()
    try:
        with pytest.raises(EngineTimeoutError) as e:
            server.generate([[3, 4, 5]], LONG)
    finally:
        th.join(30)
        os.kill(pid, signal.SIGCONT)
    elapsed = time.time() - t0
    msg = str(e.value)
    assert server.url in msg and "no progress" in msg and "[rfpo-embedded" in msg  # log tail quoted
    assert elapsed < 20, elapsed
    server.abort()


def test_watchdog_on_external_embedded_server_uses_progress_counter(server):
    ext = EngineClient(server.url, watchdog_s=1.5, retries=1)
    assert ext.kind == "embedded" and not ext.processes
    pid = server.processes[0].pid
    th = _when_generating(ext, lambda: os.kill(pid, signal.SIGSTOP))
    try:
        with pytest.raises(EngineTimeoutError, match="made no progress for 2s .*decode-step counter unchanged"):
            ext.generate([[3, 4, 5]], LONG)
    finally:
        th.join(30)
        os.kill(pid, signal.SIGCONT)
    server.abort()


def test_killed_server_mid_request_names_address_and_log(server):
    """Two callers in flight when the server is SIGKILLed: the launching client (knows the process and
    its log) and a plain client of the same URL (knows only the address)."""
    proc = server.processes[0]
    ext = EngineClient(server.url, retries=2, backoff_s=0.1)
    box = {}

    def managed():
        try:
            server.generate([[3, 4, 5]], LONG)
        except Exception as e:  # noqa: BLE001 - inspected below
            box["managed"] = e

    mt = threading.Thread(target=managed)
    mt.start()
    th = _when_generating(server, lambda: os.kill(proc.pid, signal.SIGKILL))
    t0 = time.time()
    with pytest.raises(EngineConnectionError) as e:
        ext.generate([[6, 7]], LONG)
    th.join(30)
    mt.join(30)
    assert time.time() - t0 < 20
    msg = str(e.value)
    assert server.url in msg and "Check that the server is running" in msg
    msg = str(box["managed"])
    assert isinstance(box["managed"], EngineConnectionError)
    assert server.url in msg and "died during /generate" in msg and "Check its log" in msg
    assert str(proc.log_path) in msg and "exited with code -9" in msg
    with pytest.raises(EngineConnectionError, match="died"):  # later control calls fail fast too
        server.flush_cache()


def test_unreachable_address_error_names_it():
    port = free_port()
    c = EngineClient(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01)
    with pytest.raises(EngineConnectionError) as e:
        c.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    assert f"127.0.0.1:{port}" in str(e.value) and "Check that the server is running" in str(e.value)
    with pytest.raises(EngineConnectionError, match=f"127.0.0.1:{port}"):
        c.release_memory()
    assert not c.health()


def test_startup_failure_reports_log(tmp_path):
    bad = tmp_path / "bad_model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "qwen2", truncated')
    with pytest.raises(EngineConnectionError) as e:
        launch_embedded_server(str(bad), log_dir=tmp_path / "logs", startup_timeout_s=120)
    assert "exited during startup" in str(e.value) and "config.json is not valid JSON" in str(e.value)
    assert not any(p.name.startswith("embedded") and p.alive() for p in running_processes())
    with pytest.raises(FileNotFoundError, match="config.json"):
        launch_embedded_server(str(tmp_path / "nope"))


TRAINER = textwrap.dedent("""
    import signal, sys, time
    from rfpo_megatron.rollout import SamplingParams, launch_embedded_server
    model, mode, logs = sys.argv[1:4]
    got = []
    if mode == "handler":  # an application SIGTERM handler installed first, like the trainer's
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    c = launch_embedded_server(model, log_dir=logs)
    print(c.processes[0].pid, flush=True)
    if mode == "handler":
        while not got:
            time.sleep(0.02)
        out = c.generate([[1, 2]], SamplingParams(max_new_tokens=2, ignore_eos=True))
        print("served after SIGTERM", len(out[0][0].output_ids), flush=True)
        raise RuntimeError("trainer crashed")
    time.sleep(600)
""")


def test_no_orphan_servers_after_trainer_exit(model_dir, tmp_path):
    """Trainer with its own SIGTERM handler (server keeps serving) then raising, trainer without a handler
    getting SIGTERM, trainer getting SIGKILL: its server must not survive any of them."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    kids = {mode: subprocess.Popen([sys.executable, str(script), str(model_dir), mode, str(tmp_path / mode)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for mode in ("handler", "sigterm", "sigkill")}
    server_pids = {}
    try:
        for mode, kid in kids.items():
            line = kid.stdout.readline()
            assert line.strip().isdigit(), (mode, line, kid.stderr.read() if kid.poll() is not None else "")
            server_pids[mode] = int(line)
        kids["handler"].send_signal(signal.SIGTERM)
        kids["sigterm"].send_signal(signal.SIGTERM)
        kids["sigkill"].send_signal(signal.SIGKILL)
        codes = {mode: kid.wait(60) for mode, kid in kids.items()}
        assert codes["handler"] == 1 and "trainer crashed" in kids["handler"].stderr.read()
        assert "served after SIGTERM 2" in kids["handler"].stdout.read()
        assert codes["sigterm"] == 128 + signal.SIGTERM
        assert codes["sigkill"] == -signal.SIGKILL
        for mode, pid in server_pids.items():
            assert wait_dead(pid), f"server {pid} of the '{mode}' trainer survived it"
    finally:
        for kid in kids.values():
            if kid.poll() is None:
                kid.kill()
        for pid in server_pids.values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_stop_kills_grandchildren_after_leader_exit(tmp_path):
    """A server whose main process died but left children (SGLang's scheduler processes) behind."""
    proc = spawn("leader", ["sh", "-c", "sleep 300 & echo $!; sleep 300 & echo $!; exit 0"], tmp_path / "leader.log")
    proc.popen.wait(10)
    deadline = time.time() + 10
    while len(proc.log_tail().split()) < 2 and time.time() < deadline:
        time.sleep(0.02)
    kids = [int(x) for x in proc.log_tail().split()]
    assert len(kids) == 2 and all(pid_alive(k) for k in kids)
    proc.stop(grace_s=2)  # (kill_all, which the atexit hook runs, is covered by the orphan test)
    assert all(wait_dead(k, 5) for k in kids)
    assert proc not in running_processes()
