"""Run a function on N local ranks (spawned processes, gloo, free port): multi-rank tests and CPU demos.

``spawn_world(fn, world_size, *args)`` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
MASTER_PORT in each child, calls ``fn(rank, *args)`` (``fn`` must be importable at
module level), and returns the list of per-rank return values (picklable). A
failing rank's traceback is re-raised in the caller; a hung world is killed
after ``timeout_s``.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(rank: int, world: int, port: int, threads: int, fn: Callable, args: tuple, q, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )
    import torch

    torch.set_num_threads(threads)
    try:
        result = fn(rank, *args)
        # through a file: tensors sent over the queue would live in shared memory owned by this
        # (exiting) process
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path)
        q.put((rank, "ok", path))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1)


def spawn_world(fn: Callable, world_size: int, *args: Any, timeout_s: float = 600.0, threads: int = 1) -> list:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned ranks; return [result of rank 0, 1, ...]."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    out_dir = tempfile.mkdtemp(prefix="spawn_world_")
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, threads, fn, args, q, out_dir), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"spawn_world: ranks did not finish within {timeout_s:.0f}s")
            try:
                rank, status, val = q.get(timeout=min(left, 5.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and len(results) + len(errors) < world_size:
                    # a rank died without reporting (e.g. killed); give the queue a moment, then fail
                    try:
                        rank, status, val = q.get(timeout=5.0)
                    except queue.Empty:
                        raise RuntimeError(
                            f"spawn_world: rank process exited with code {dead[0].exitcode} without a result"
                        ) from None
                else:
                    continue
            if status == "ok":
                import torch

                results[rank] = torch.load(val, weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{val}")
                break
    finally:
        for p in procs:
            p.join(timeout=2 if errors else 30)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(out_dir, ignore_errors=True)
    if errors:
        raise RuntimeError("spawn_world: a rank failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
