"""Run a coroutine to completion from synchronous code, with signals landing in the waiting thread.

The trainer is synchronous; the engine client (and async reward functions) are coroutines. `asyncio.run` on the
main thread would put the event loop where signal handlers run: a SIGTERM whose handler raises (the trainer's
`Preempted`, train/runtime.py) while the loop is inside one of its callbacks (aiohttp's protocol code) is logged
and dropped by asyncio ("Exception in callback ..."), the step goes on against servers the same signal stopped,
and the rank dies of their connection errors instead of checkpointing. `run_blocking` runs the loop on a worker
thread; the caller waits on an Event, where a handler's exception surfaces as itself, and the coroutine is
cancelled (its sessions closed) before that exception propagates.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine

CANCEL_WAIT_S = 10.0  # how long an interrupted caller waits for the cancelled coroutine to unwind


def run_blocking(coro: Coroutine[Any, Any, Any], name: str = "asyncio-worker") -> Any:
    """`coro`'s result (or its exception), run on a fresh event loop in a daemon thread.

    Works with or without an event loop running in the caller's thread. An exception raised in the caller
    while it waits (a signal handler's, KeyboardInterrupt) cancels the coroutine, waits up to CANCEL_WAIT_S for
    it to unwind, and is re-raised."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(coro)
    box: dict[str, Any] = {}
    done = threading.Event()  # waited on, not Thread.join: a join interrupted by a signal marks the thread
    #                           stopped while it still runs (CPython bpo-45274), so a second join cannot wait

    def work() -> None:
        try:
            box["result"] = loop.run_until_complete(task)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            box["error"] = exc
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
            finally:
                done.set()

    th = threading.Thread(target=work, name=name, daemon=True)
    th.start()
    try:
        done.wait()
    except BaseException:
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed in between: nothing left to cancel
                pass
        done.wait(CANCEL_WAIT_S)
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]
