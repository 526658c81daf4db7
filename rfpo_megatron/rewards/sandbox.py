"""A sandboxed Python subprocess for untrusted code: limits, no network, a scratch dir, killed process groups.

`run_sandboxed(code, tests, limits)` starts `python -I rewards/sandbox_harness.py SCRATCH` in a fresh session
(its own process group) with a minimal environment, in a fresh scratch directory that is removed afterwards:
  * CPU time `cpu_s` (RLIMIT_CPU), address space `memory_mb` (RLIMIT_AS), bytes per written file, stdout and
    stderr included, `max_output_bytes` (RLIMIT_FSIZE), no core files; wall time `wall_s` (then killed);
  * network: an unshared network namespace (`unshare -n`, or `unshare -rn` without root) when the host allows
    it, else an audit hook refusing socket creation, connect, bind and name lookups (`Sandbox.network`);
  * processes: at most `max_procs` (a pids cgroup when running as root, where RLIMIT_NPROC does not apply; else
    RLIMIT_NPROC over the user's current process count); with neither, process creation is refused by the
    audit hook (`Sandbox.processes`);
  * afterwards the process group, and every process left in the cgroup, is SIGKILLed and reaped.
The audit-hook fallbacks stop Python-level calls only (not native code); the namespace and cgroup are kernel
limits. Test outcomes come from the harness's results file (see sandbox_harness.py).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Optional

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_harness.py")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits (data.reward_kwargs of the `code` reward)."""

    wall_s: float = 10.0
    cpu_s: float = 5.0
    memory_mb: int = 512
    max_output_bytes: int = 1 << 20
    max_procs: int = 16


@dataclass
class SandboxResult:
    """What happened: `status` ok | timeout (wall) | cpu_limit | output_limit | memory_limit | crashed (any
    other non-zero exit, e.g. SIGKILL at the hard CPU limit)."""

    status: str
    returncode: Optional[int]
    events: list = field(default_factory=list)  # the harness's JSON lines
    stdout: str = ""  # the first 4000 characters
    stderr: str = ""
    elapsed_s: float = 0.0


@lru_cache(maxsize=None)
def netns_prefix() -> tuple[str, ...]:
    """The command prefix that runs a program in a new, empty network namespace, or () when not permitted."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for args in ([["-n"]] if os.geteuid() == 0 else []) + [["-r", "-n"]]:
        try:
            if subprocess.run([exe, *args, "true"], capture_output=True, timeout=10).returncode == 0:
                return (exe, *args, "--")
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ()


@lru_cache(maxsize=None)
def pids_cgroup_root() -> Optional[str]:
    """A cgroup directory where a child pids cgroup can be made (as root), or None."""
    if os.geteuid() != 0:
        return None
    for root in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        if not os.path.isfile(os.path.join(root, "cgroup.procs")):
            continue
        probe = os.path.join(root, f"rfpo-probe-{uuid.uuid4().hex[:8]}")
        try:
            os.mkdir(probe)
            try:
                with open(os.path.join(probe, "pids.max"), "w") as fh:
                    fh.write("8")
                return root
            finally:
                os.rmdir(probe)
        except OSError:
            continue
    return None


def user_process_count() -> int:
    """Processes of this real uid (RLIMIT_NPROC counts them all)."""
    uid, n = os.getuid(), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def containment() -> dict[str, str]:
    """How this host confines a sandbox: {"network": "netns"|"audit", "processes": "cgroup"|"nproc"|"audit"}."""
    net = "netns" if netns_prefix() else "audit"
    procs = "cgroup" if pids_cgroup_root() else ("nproc" if os.geteuid() != 0 else "audit")
    return {"network": net, "processes": procs}


def _kill_cgroup(cg: str, deadline_s: float = 5.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with open(os.path.join(cg, "cgroup.procs")) as fh:
                pids = [int(x) for x in fh.read().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    for _ in range(50):
        try:
            os.rmdir(cg)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _status(rc: Optional[int], timed_out: bool, events: list) -> str:
    if timed_out:
        return "timeout"
    if rc == -signal.SIGXCPU:
        return "cpu_limit"
    if rc == -signal.SIGXFSZ or any(e.get("kind") == "OutputLimit" for e in events):
        return "output_limit"
    if any(e.get("kind") == "MemoryError" for e in events):
        return "memory_limit"
    if rc != 0:
        return "crashed"
    return "ok"


def run_sandboxed(code: str, tests: list[dict], limits: SandboxLimits = SandboxLimits(),
                  network: Optional[str] = None, processes: Optional[str] = None) -> SandboxResult:
    """Run `code` then each test (see sandbox_harness.py) under `limits`. `network`/`processes` override the
    host's containment (`containment()`), e.g. "audit" to use the audit hook even where a namespace works."""
    mode = containment()
    network, processes = network or mode["network"], processes or mode["processes"]
    scratch = tempfile.mkdtemp(prefix="rfpo-sbx-")
    cg = None
    lim = asdict(limits)
    if processes == "cgroup":
        cg = os.path.join(pids_cgroup_root() or "", f"rfpo-sbx-{uuid.uuid4().hex[:12]}")
        os.mkdir(cg)
        with open(os.path.join(cg, "pids.max"), "w") as fh:
            fh.write(str(int(limits.max_procs)))
    elif processes == "nproc":
        lim["nproc"] = user_process_count() + int(limits.max_procs)
    payload = {"code": code, "tests": tests, "limits": lim, "network": network, "processes": processes,
               "cgroup": cg or ""}
    with open(os.path.join(scratch, "payload.json"), "w") as fh:
        json.dump(payload, fh)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch, "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    prefix = list(netns_prefix()) if network == "netns" else []
    cmd = prefix + [sys.executable, "-I", HARNESS, scratch]
    t0, timed_out, rc = time.monotonic(), False, None
    try:
        with open(os.path.join(scratch, "stdout"), "wb") as fo, open(os.path.join(scratch, "stderr"), "wb") as fe:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, cwd=scratch, env=env,
                                    start_new_session=True, close_fds=True)
        try:
            rc = proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if cg:
                _kill_cgroup(cg)
            rc = proc.wait(timeout=10) if rc is None else rc
        elapsed = time.monotonic() - t0
        events = _read_events(os.path.join(scratch, "results.jsonl"))
        out, err = (_head(os.path.join(scratch, name)) for name in ("stdout", "stderr"))
        return SandboxResult(_status(rc, timed_out, events), rc, events, out, err, elapsed)
    finally:
        if cg and os.path.isdir(cg):
            _kill_cgroup(cg)
        shutil.rmtree(scratch, ignore_errors=True)


def _head(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode(errors="replace")
    except OSError:
        return ""


def _read_events(path: str) -> list[dict]:
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out
