"""Hang watchdog: when no training step completes for T minutes, dump every rank's Python stacks.

Contract with the trainer (rfpo_megatron/trainer.py; the signal handling is in rfpo_megatron/train/runtime.py):
  * the trainer touches ``trainer.heartbeat_file`` after every completed step (the file's mtime is the signal;
    the sbatch scripts set it to ``$RFPO_RUN_DIR/heartbeat``);
  * every rank calls ``faulthandler.register(signal.SIGUSR1, all_threads=True)`` at start-up, so SIGUSR1
    prints all threads' stacks to that rank's stderr (``srun --label`` prefixes each line with the rank).

On a stall (no heartbeat for ``--minutes``; before the first step ``--startup-minutes`` counted from the
watchdog's start) it:
  1. sends SIGUSR1 to every rank of the training step -- under Slurm to the step's task processes on every
     node (``srun --overlap`` one task per node over ``scontrol listpids JOB.STEP``; only the tasks, not their
     children: a rollout server child without a SIGUSR1 handler would die of it), locally to ``--pids``;
  2. if ``py-spy`` is on PATH, also runs ``py-spy dump`` on each rank (under Slurm: one ``srun --overlap``
     task per node over ``scontrol listpids``) into ``<log dir>/pyspy-<n>.txt``;
  3. with ``--kill``: if still no heartbeat after another ``--minutes``, cancels the step (Slurm) or sends
     SIGTERM (local) so the job fails loudly instead of burning the allocation.
Each event is one line in ``--log`` (and stderr). Standard library only.

    python slurm/watchdog.py --heartbeat RUN/heartbeat --minutes 30 --slurm-step-name rfpo-train --log RUN/watchdog.log
    python slurm/watchdog.py --heartbeat RUN/heartbeat --minutes 5 --pids 1234 1235      # torchrun / local
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional


def log(path: Optional[str], msg: str) -> None:
    line = f"[watchdog {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}] {msg}"
    print(line, file=sys.stderr, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def heartbeat_age(path: str, start: float) -> tuple[float, bool]:
    """(seconds since the last heartbeat or since ``start`` if none yet, whether a heartbeat exists)."""
    try:
        return time.time() - os.path.getmtime(path), True
    except OSError:
        return time.time() - start, False


def find_slurm_step(name: str, job_id: str) -> Optional[str]:
    """JOB.STEP id of the running step called ``name`` in ``job_id`` (None if not running)."""
    try:
        out = subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i|%j"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        sid, _, sname = line.strip().partition("|")
        if sname == name:
            return sid
    return None


def signal_step_tasks_cmd(step: str, sig: str, nodes: int) -> list[str]:
    """srun command that sends ``sig`` to the task processes (LOCALID != '-') of ``step`` on every node."""
    script = (f"scontrol listpids {step} 2>/dev/null | awk 'NR>1 && $4 != \"-\" {{print $1}}' "
              f"| xargs -r kill -{sig}")
    return ["srun", "--overlap", f"--jobid={step.split('.')[0]}", f"--nodes={nodes}", f"--ntasks={nodes}",
            "-J", "rfpo-signal", "bash", "-c", script]


def signal_ranks(step: Optional[str], pids: list[int], sig: signal.Signals, logf: Optional[str]) -> None:
    if step:
        nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
        r = subprocess.run(signal_step_tasks_cmd(step, sig.name.replace("SIG", ""), nodes), capture_output=True,
                           text=True, timeout=120)
        log(logf, f"{sig.name} to the tasks of step {step} on {nodes} node(s): rc={r.returncode} {r.stderr.strip()}")
    for pid in pids:
        try:
            os.kill(pid, sig)
            log(logf, f"sent {sig.name} to pid {pid}")
        except ProcessLookupError:
            log(logf, f"pid {pid} is gone")


def pyspy_dump(step: Optional[str], pids: list[int], out_dir: str, n: int, logf: Optional[str]) -> None:
    exe = shutil.which("py-spy")
    if not exe:
        return
    out = os.path.join(out_dir, f"pyspy-{n}.txt")
    if step:
        job = step.split(".")[0]
        script = (f"for p in $(scontrol listpids {step} 2>/dev/null | awk 'NR>1{{print $1}}'); do "
                  f"echo \"== $(hostname) pid $p\"; {exe} dump --pid $p 2>&1; done")
        nodes = os.environ.get("SLURM_JOB_NUM_NODES", "1")
        cmd = ["srun", "--overlap", f"--jobid={job}", f"--nodes={nodes}", f"--ntasks={nodes}", "-J", "rfpo-pyspy",
               "bash", "-c", script]
    else:
        cmd = ["bash", "-c", "; ".join(f"echo '== pid {p}'; {exe} dump --pid {p} 2>&1" for p in pids)]
    with open(out, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    log(logf, f"py-spy dump -> {out} (rc={r.returncode})")


def run(a: argparse.Namespace) -> int:
    start = time.time()
    job = os.environ.get("SLURM_JOB_ID")
    out_dir = os.path.dirname(os.path.abspath(a.log or a.heartbeat))
    period, startup = 60.0 * a.minutes, 60.0 * (a.startup_minutes if a.startup_minutes is not None else a.minutes)
    log(a.log, f"watching {a.heartbeat}: stall after {a.minutes:g} min ({startup / 60:g} min before the first step)")
    dumps, last_dump_at, last_mtime = 0, None, None
    while True:
        if a.pids and not any(_alive(p) for p in a.pids):
            log(a.log, "all watched processes exited; watchdog done")
            return 0
        age, seen = heartbeat_age(a.heartbeat, start)
        mtime = os.path.getmtime(a.heartbeat) if seen else None
        if mtime != last_mtime:  # progress: re-arm
            last_mtime, dumps, last_dump_at = mtime, 0, None
        limit = period if seen else startup
        if age >= limit and (last_dump_at is None or time.time() - last_dump_at >= period):
            step = find_slurm_step(a.slurm_step_name, job) if (job and a.slurm_step_name) else None
            what = "since the last step" if seen else "and no step completed yet"
            if dumps >= 1 and a.kill:
                log(a.log, f"STALL: still no progress {age / 60:.1f} min {what}: cancelling the training step")
                if step:
                    subprocess.run(["scancel", step])
                signal_ranks(None, a.pids, signal.SIGTERM, a.log)
                return 3
            dumps += 1
            last_dump_at = time.time()
            log(a.log, f"STALL: {age / 60:.1f} min {what} -> dump #{dumps} of all ranks' stacks "
                       f"(step {step or '-'}, pids {a.pids or '-'}); look for 'Current thread' blocks in the job log")
            signal_ranks(step, a.pids, signal.SIGUSR1, a.log)
            try:
                pyspy_dump(step, a.pids, out_dir, dumps, a.log)
            except (OSError, subprocess.TimeoutExpired) as e:
                log(a.log, f"py-spy failed: {e}")
        time.sleep(a.poll_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heartbeat", required=True, help="file the trainer touches after every step")
    ap.add_argument("--minutes", type=float, required=True, help="stall threshold between steps")
    ap.add_argument("--startup-minutes", type=float, help="stall threshold before the first step (default: --minutes)")
    ap.add_argument("--slurm-step-name", help="signal the running step of this job with this name (srun -J)")
    ap.add_argument("--pids", type=int, nargs="*", default=[], help="local rank processes to signal (no Slurm)")
    ap.add_argument("--log", help="append events to this file")
    ap.add_argument("--kill", action="store_true", help="cancel/terminate after a second silent period")
    ap.add_argument("--poll-s", type=float, default=5.0)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
