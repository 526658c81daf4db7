"""Runs INSIDE the sandbox child (`python -I sandbox_harness.py SCRATCH`); stdlib only, never imported by the package.

Reads SCRATCH/payload.json = {code, tests, limits, network, cgroup}, joins the pids cgroup, sets the rlimits,
installs the network/process audit hook when asked, then executes the solution and each test, appending one
JSON line per event to SCRATCH/results.jsonl: {"start": i} before test i, then {"test": i, "ok", "kind",
"detail"}; {"load_error": ...} when the solution itself raises. A test's `detail` is what its message may show:
for a hidden test only the exception raised inside the solution (never the test's own source or values).
"""
import io
import json
import os
import resource
import sys
import traceback

MAIN_PID = os.getpid()
_NET_EVENTS = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
               "socket.gethostbyname", "socket.gethostbyaddr"}
_PROC_EVENTS = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
                "pty.spawn"}
DETAIL_LIMIT = 600


def _set_limits(lim):
    cpu = max(1, int(lim["cpu_s"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = int(lim["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(lim["max_output_bytes"]), int(lim["max_output_bytes"])))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if lim.get("nproc"):
        resource.setrlimit(resource.RLIMIT_NPROC, (int(lim["nproc"]), int(lim["nproc"])))


def _kind(exc):
    """The exception's class name; "OutputLimit" for a write past RLIMIT_FSIZE (Python ignores SIGXFSZ) or the
    captured-stdout cap, "MemoryError" past RLIMIT_AS."""
    if isinstance(exc, OSError) and (exc.errno == 27 or "output limit exceeded" in str(exc)):
        return "OutputLimit"
    return type(exc).__name__


def _hook(blocked):
    def hook(event, args):
        if event in blocked:
            what = "network access" if event.startswith("socket") else "starting processes"
            raise PermissionError(f"sandbox: {what} is not allowed ({event})")
    return hook


def _clip(text, limit=DETAIL_LIMIT):
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def _solution_detail(exc):
    """The exception as raised inside the solution: type, message, solution line (no test frames)."""
    tb = traceback.extract_tb(exc.__traceback__)
    sol = [f for f in tb if f.filename == "<solution>"]
    where = f" (solution line {sol[-1].lineno})" if sol else ""
    if not sol and isinstance(exc, AssertionError):
        return "AssertionError"
    return _clip(f"{type(exc).__name__}: {exc}{where}" if str(exc) else f"{type(exc).__name__}{where}")


def _visible_detail(exc, source):
    tb = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<")]
    lines = []
    for f in tb:
        src = source.get(f.filename, "").splitlines()
        code = src[f.lineno - 1].strip() if f.lineno and 0 < f.lineno <= len(src) else ""
        lines.append(f"{f.filename} line {f.lineno}: {code}")
    head = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return _clip("; ".join([head] + lines[-3:]))


class _CappedIO(io.StringIO):
    def __init__(self, cap):
        super().__init__()
        self.cap = cap

    def write(self, s):
        if self.tell() + len(s) > self.cap:
            raise OSError("sandbox: output limit exceeded")
        return super().write(s)


def main():
    scratch = sys.argv[1]
    with open(os.path.join(scratch, "payload.json")) as fh:
        p = json.load(fh)
    out = open(os.path.join(scratch, "results.jsonl"), "a", buffering=1)

    def emit(obj):
        if os.getpid() == MAIN_PID:
            out.write(json.dumps(obj) + "\n")

    if p.get("cgroup"):
        with open(os.path.join(p["cgroup"], "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
    lim = p["limits"]
    blocked = set()
    if p.get("network") == "audit":
        blocked |= _NET_EVENTS
    if p.get("processes") == "audit":
        blocked |= _PROC_EVENTS
    _set_limits(lim)
    os.chdir(scratch)
    code, tests = p["code"], p["tests"]
    source = {"<solution>": code}
    try:
        compiled = compile(code, "<solution>", "exec")
    except SyntaxError as exc:
        emit({"load_error": _clip(f"SyntaxError: {exc.msg} (solution line {exc.lineno})")})
        return
    if blocked:
        sys.addaudithook(_hook(blocked))
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    if not all(("input" in t or "output" in t) for t in tests) or not tests:
        try:
            exec(compiled, ns)
        except BaseException as exc:  # noqa: B902 - SystemExit / KeyboardInterrupt of the user code too
            if os.getpid() != MAIN_PID:
                os._exit(0)
            emit({"load_error": _visible_detail(exc, source), "kind": _kind(exc)})
            return
        finally:
            if os.getpid() != MAIN_PID:
                os._exit(0)
    cap = int(lim["max_output_bytes"])
    for i, t in enumerate(tests):
        emit({"start": i})
        visible = bool(t.get("visible"))
        name = f"<test {i}>"
        ok, kind, detail = True, "", ""
        real_in, real_out = sys.stdin, sys.stdout
        try:
            if "input" in t or "output" in t:
                sys.stdin, sys.stdout = io.StringIO(str(t.get("input", ""))), _CappedIO(cap)
                exec(compiled, {"__name__": "__main__", "__builtins__": __builtins__})
                got = sys.stdout.getvalue()
                sys.stdin, sys.stdout = real_in, real_out
                want = str(t.get("output", ""))
                if [ln.rstrip() for ln in got.strip().splitlines()] != [ln.rstrip() for ln in want.strip().splitlines()]:
                    ok, kind = False, "WrongOutput"
                    detail = (_clip(f"expected output {want.strip()[:200]!r}, got {got.strip()[:200]!r}")
                              if visible else "wrong output")
            else:
                source[name] = t["code"]
                exec(compile(t["code"], name, "exec"), dict(ns))
        except BaseException as exc:  # noqa: B902
            sys.stdin, sys.stdout = real_in, real_out
            if os.getpid() != MAIN_PID:
                os._exit(0)
            ok, kind = False, _kind(exc)
            detail = _visible_detail(exc, source) if visible else _solution_detail(exc)
        finally:
            if os.getpid() != MAIN_PID:
                os._exit(0)
            sys.stdin, sys.stdout = real_in, real_out
        emit({"test": i, "ok": ok, "kind": kind, "detail": detail})


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
