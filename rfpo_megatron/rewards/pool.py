"""Worker-process pool with a timeout per item, robust to worker death (for signal-based verifiers).

math-verify times out with SIGALRM, which only works in a process's main thread; so verifiers run in
child processes, one item at a time per worker. An item that overruns `timeout_s` gets its worker
killed and replaced, and comes back as `PoolResult(ok=False, error="timeout ...")`; a worker that dies
(segfault, os._exit) is replaced the same way. The other items are unaffected.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Optional, Sequence


@dataclass
class PoolResult:
    """Outcome of one item: `value` when ok, else a one-line `error` (timeout / worker died / raised)."""

    ok: bool
    value: Any = None
    error: str = ""


def _worker_main(fn: Callable[..., Any], conn, initializer: Optional[Callable[[], None]]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # keep workers single-threaded without importing torch for nothing
        sys.modules["torch"].set_num_threads(1)
    try:
        if initializer is not None:
            initializer()
        conn.send(("ready", True, None, ""))
    except Exception as exc:
        conn.send(("ready", False, None, f"initializer raised {exc!r}"))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, args = msg
        try:
            conn.send((idx, True, fn(*args), ""))
        except Exception as exc:  # the item failed, the worker lives on
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            conn.send((idx, False, None, f"raised {tb}"))


class _Worker:
    def __init__(self, ctx, fn, initializer):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(fn, child, initializer), daemon=True)
        self.proc.start()
        child.close()
        self.item: int | None = None
        self.deadline = 0.0

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the worker has started (imports, initializer): startup is not charged to items."""
        if not self.conn.poll(timeout_s):
            self.kill()
            raise RuntimeError(f"verifier worker did not start within {timeout_s:g}s")
        try:
            tag, ok, _, err = self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise RuntimeError(f"verifier worker died at startup (exit code {self.proc.exitcode})") from None
        if not ok:
            self.kill()
            raise RuntimeError(f"verifier worker failed to start: {err}")

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(timeout=5)
        except Exception:
            pass
        try:
            self.conn.close()
        except Exception:
            pass


class ProcessPool:
    """`ProcessPool(fn, num_workers, timeout_s).map([args, ...]) -> [PoolResult, ...]` in input order.

    `fn` (and `initializer`, run once per worker before it takes items, e.g. to import heavy
    modules) must be picklable (module-level functions). Workers start lazily, persist across `map`
    calls, and are replaced after a timeout or death; worker startup is not counted in `timeout_s`.
    Call `close()` when done (also on GC).
    """

    def __init__(self, fn: Callable[..., Any], num_workers: int = 2, timeout_s: float = 10.0,
                 start_method: str = "spawn", initializer: Optional[Callable[[], None]] = None,
                 startup_timeout_s: float = 120.0):
        if num_workers < 1:
            raise ValueError(f"ProcessPool: num_workers must be >= 1, got {num_workers}")
        self.fn, self.num_workers, self.timeout_s = fn, num_workers, float(timeout_s)
        self.initializer, self.startup_timeout_s = initializer, float(startup_timeout_s)
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self.restarts = 0

    def _spawn(self) -> _Worker:
        w = _Worker(self._ctx, self.fn, self.initializer)
        w.wait_ready(self.startup_timeout_s)
        return w

    def map(self, items: Sequence[Sequence[Any]]) -> list[PoolResult]:
        """Run `fn(*args)` for each `args` in `items`; returns one PoolResult per item, in order."""
        n = len(items)
        results: list[PoolResult | None] = [None] * n
        if n == 0:
            return []
        new = [_Worker(self._ctx, self.fn, self.initializer)
               for _ in range(min(self.num_workers, n) - len(self._workers))]
        for w in new:  # start in parallel, then wait for each
            w.wait_ready(self.startup_timeout_s)
        self._workers.extend(new)
        pending = list(range(n))[::-1]  # pop() from the end = input order
        done = 0

        def replace(w: _Worker, error: str) -> None:
            nonlocal done
            if w.item is not None:
                results[w.item] = PoolResult(False, None, error)
                done += 1
            w.kill()
            self.restarts += 1
            self._workers[self._workers.index(w)] = self._spawn()

        while done < n:
            for w in list(self._workers):
                if w.item is None and pending:
                    if not w.proc.is_alive():  # died while idle: replace it, no item is charged
                        replace(w, "")
                        continue
                    idx = pending.pop()
                    try:
                        w.conn.send((idx, tuple(items[idx])))
                    except (BrokenPipeError, OSError):
                        pending.append(idx)
                        replace(w, "")
                        continue
                    w.item, w.deadline = idx, time.monotonic() + self.timeout_s
            busy = [w for w in self._workers if w.item is not None]
            if not busy:
                continue
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_s)
            for w in busy:
                if w.conn in ready:
                    try:
                        idx, ok, value, err = w.conn.recv()
                    except (EOFError, OSError):
                        w.proc.join(timeout=5)
                        replace(w, f"worker died (exit code {w.proc.exitcode})")
                        continue
                    results[idx] = PoolResult(ok, value, err)
                    w.item = None
                    done += 1
                elif time.monotonic() >= w.deadline:
                    replace(w, f"timeout after {self.timeout_s:g}s")
        return [r if r is not None else PoolResult(False, None, "lost") for r in results]

    def close(self) -> None:
        """Stop all workers."""
        for w in self._workers:
            try:
                w.conn.send(None)
            except Exception:
                pass
        for w in self._workers:
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.kill()
        self._workers = []

    def __enter__(self) -> "ProcessPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
