"""The hang watchdog against real processes: stack dumps via SIGUSR1 + faulthandler, re-arming, kill."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WATCHDOG = REPO / "slurm" / "watchdog.py"

# A stand-in rank honouring the trainer's contract: faulthandler on SIGUSR1, heartbeat touched per step.
RANK = textwrap.dedent(
    """
    import faulthandler, os, signal, sys, time
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    hb, steps, step_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    open(sys.argv[4], "w").close()  # handlers installed (the trainer does this first thing)

    def touch():
        with open(hb, "a"):
            os.utime(hb, None)

    def stuck_in_allreduce_rank_%s():
        time.sleep(600)

    for _ in range(steps):
        time.sleep(step_s)
        touch()
    if steps >= 0 and os.environ.get("HANG", "1") == "1":
        stuck_in_allreduce_rank_%s()
    """
)


def _rank(tmp: Path, r: int, hb: Path, steps: int, step_s: float, hang: bool = True) -> subprocess.Popen:
    src = tmp / f"rank{r}.py"
    src.write_text(RANK % (r, r))
    err = open(tmp / f"rank{r}.err", "w")
    ready = tmp / f"rank{r}.ready"
    p = subprocess.Popen([sys.executable, str(src), str(hb), str(steps), str(step_s), str(ready)], stderr=err,
                         env=dict(os.environ, HANG="1" if hang else "0"))
    deadline = time.time() + 60  # a loaded machine can take seconds to start Python
    while not ready.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), "rank did not start"
    return p


def _watchdog(hb: Path, log: Path, pids: list[int], minutes: float, startup: float | None = None, kill=True):
    cmd = [sys.executable, str(WATCHDOG), "--heartbeat", str(hb), "--minutes", str(minutes), "--log", str(log),
           "--poll-s", "0.1", "--pids", *map(str, pids)]
    if startup is not None:
        cmd += ["--startup-minutes", str(startup)]
    if kill:
        cmd.append("--kill")
    return subprocess.Popen(cmd, stderr=subprocess.DEVNULL)


def test_stall_dumps_every_rank_then_kills(tmp_path):
    hb = tmp_path / "heartbeat"
    ranks = [_rank(tmp_path, r, hb, steps=3, step_s=0.2) for r in range(2)]
    wd = _watchdog(hb, tmp_path / "wd.log", [p.pid for p in ranks], minutes=1.5 / 60)
    try:
        assert wd.wait(timeout=60) == 3  # dumped, then cancelled after a second silent period
        for p in ranks:
            p.wait(timeout=10)
    finally:
        for p in ranks + [wd]:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(ranks):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert f"stuck_in_allreduce_rank_{r}" in err, err  # this rank's own stack was dumped
        assert p.returncode == -15  # SIGTERM from the watchdog
    log = (tmp_path / "wd.log").read_text()
    assert log.count("STALL") == 2 and "dump #1" in log and "cancelling" in log
    assert "since the last step" in log  # heartbeats were seen before the stall


def test_progress_rearms_and_no_dump_while_steps_complete(tmp_path):
    hb = tmp_path / "heartbeat"
    rank = _rank(tmp_path, 0, hb, steps=12, step_s=0.25, hang=False)  # 3 s of steady steps, then exits
    wd = _watchdog(hb, tmp_path / "wd.log", [rank.pid], minutes=2.5 / 60, startup=2.5 / 60)
    try:
        assert rank.wait(timeout=30) == 0
        assert wd.wait(timeout=30) == 0  # all watched processes exited
    finally:
        for p in (rank, wd):
            if p.poll() is None:
                p.kill()
    log = (tmp_path / "wd.log").read_text()
    assert "STALL" not in log and "all watched processes exited" in log
    assert "stuck_in_allreduce" not in (tmp_path / "rank0.err").read_text()


def test_startup_hang_before_first_step_is_caught(tmp_path):
    hb = tmp_path / "never-touched"
    rank = _rank(tmp_path, 0, hb, steps=0, step_s=0.0)  # hangs before any step (e.g. NCCL init)
    t0 = time.time()
    wd = _watchdog(hb, tmp_path / "wd.log", [rank.pid], minutes=10.0, startup=1.0 / 60, kill=False)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and "stuck_in_allreduce" not in (tmp_path / "rank0.err").read_text():
            time.sleep(0.1)
    finally:
        wd.kill()
        rank.kill()
        wd.wait()
        rank.wait()
    assert "stuck_in_allreduce_rank_0" in (tmp_path / "rank0.err").read_text()
    assert time.time() - t0 >= 1.0  # not before the startup allowance
    log = (tmp_path / "wd.log").read_text()
    assert "no step completed yet" in log and "cancelling" not in log
