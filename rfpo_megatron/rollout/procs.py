"""Server process management: spawn in its own process group, log to a file, wait healthy, never orphan.

Every server started here is registered; all of them are killed (SIGTERM to the whole process group,
SIGKILL after a grace period) when the trainer exits normally or on an exception (atexit), on SIGTERM/SIGHUP (a handler installed
from the main thread when the application has none; otherwise the application's handler exits and
atexit cleans up), and — when spawned from the main thread — when
the trainer dies without cleaning up (PR_SET_PDEATHSIG on Linux).
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .base import EngineConnectionError, EngineTimeoutError

_REGISTRY: dict[int, "ManagedProcess"] = {}
_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False


@dataclass
class ManagedProcess:
    """A server subprocess: its command, log file and (when it serves HTTP) base URL."""

    name: str
    cmd: list[str]
    popen: subprocess.Popen
    log_path: Path
    url: str | None = None
    started_at: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_size(self) -> int:
        """Bytes written to the log so far: the watchdog's progress marker."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self, lines: int = 30, max_bytes: int = 16384) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                text = f.read().decode("utf-8", errors="replace")
        except OSError as e:
            return f"<log {self.log_path} unreadable: {e}>"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        rc = self.returncode()
        state = "running" if rc is None else f"exited with code {rc}"
        return f"{self.name} (pid {self.pid}, {state}, url {self.url}, log {self.log_path})"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after grace_s; idempotent."""
        # start_new_session=True: the server leads its own process group (pgid == pid), which outlives
        # the leader while any child (e.g. SGLang's scheduler processes) is still in it.
        pgid = self.pid
        if pgid != os.getpgid(0):
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.time() + grace_s
            while time.time() < deadline and self.popen.poll() is None:
                time.sleep(0.05)
            _signal_group(pgid, signal.SIGKILL)  # grandchildren that ignored SIGTERM
        elif self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        with _LOCK:
            _REGISTRY.pop(self.pid, None)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def spawn(name: str, cmd: list[str], log_path: str | os.PathLike, env: dict[str, str] | None = None,
          cwd: str | None = None, url: str | None = None) -> ManagedProcess:
    """Start `cmd` in a new process group with stdout+stderr appended to log_path, and register it."""
    _install_handlers()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    in_main = threading.current_thread() is threading.main_thread()
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            start_new_session=True, preexec_fn=_set_pdeathsig if (in_main and sys.platform.startswith("linux")) else None,
        )
    proc = ManagedProcess(name=name, cmd=list(cmd), popen=popen, log_path=log_path, url=url)
    with _LOCK:
        _REGISTRY[popen.pid] = proc
    return proc


def running_processes() -> list[ManagedProcess]:
    with _LOCK:
        return list(_REGISTRY.values())


def kill_all(grace_s: float = 5.0) -> None:
    """Stop every registered server (called at exit and from the signal handlers)."""
    for proc in running_processes():
        try:
            proc.stop(grace_s=grace_s)
        except Exception:
            pass


def _install_handlers() -> None:
    global _HANDLERS_INSTALLED
    with _LOCK:
        if _HANDLERS_INSTALLED:
            return
        _HANDLERS_INSTALLED = True
    atexit.register(kill_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        # Only where the signal would kill the process outright: an application handler (e.g. the
        # trainer's checkpoint-and-exit) stays in charge, and the atexit hook cleans up when it exits.
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _exit_on_signal)


def _exit_on_signal(signum, frame) -> None:
    kill_all()
    raise SystemExit(128 + signum)  # through SystemExit so finally-blocks and atexit still run


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: ManagedProcess | None, timeout_s: float, path: str = "/health_generate",
                 poll_s: float = 0.25) -> None:
    """Poll GET url+path until HTTP 200. Raises with the log tail if the process dies or time runs out."""
    deadline = time.time() + timeout_s
    last_err = "no answer yet"
    while time.time() < deadline:
        if proc is not None and not proc.alive():
            raise EngineConnectionError(
                f"rollout server {url} exited during startup ({proc.describe()}). "
                f"Check the command and the model path; last log lines:\n{proc.log_tail()}"
            )
        try:
            r = requests.get(url + path, timeout=min(10.0, max(1.0, deadline - time.time())))
            if r.status_code == 200:
                return
            last_err = f"HTTP {r.status_code} {r.text[:200]}"
        except requests.RequestException as e:
            last_err = f"{type(e).__name__}"
        time.sleep(poll_s)
    tail = f"; last log lines:\n{proc.log_tail()}" if proc is not None else ""
    raise EngineTimeoutError(
        f"rollout server {url} not healthy after {timeout_s:.0f}s ({path}: {last_err}). "
        f"Raise the startup timeout for big models, or check the server log{tail}"
    )
