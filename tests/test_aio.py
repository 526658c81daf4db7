"""rfpo_megatron.aio.run_blocking: results and errors pass through; a signal handler's exception raised while
the caller waits surfaces as itself and cancels the coroutine (the trainer's SIGTERM -> Preempted path)."""
from __future__ import annotations

import asyncio
import signal
import time

import pytest

from rfpo_megatron.aio import run_blocking


class Stop(Exception):
    pass


def test_result_error_and_a_running_loop():
    async def add(a, b):
        await asyncio.sleep(0)
        return a + b

    async def fail():
        raise ValueError("bad")

    assert run_blocking(add(2, 3)) == 5
    with pytest.raises(ValueError, match="bad"):
        run_blocking(fail())

    async def outer():  # called from inside a running loop (a user's async reward calling the engine client)
        return run_blocking(add(1, 1))

    assert asyncio.run(outer()) == 2


def test_signal_handler_exception_reaches_the_caller_and_cancels_the_coroutine():
    seen = []

    async def long_request():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    def on_alarm(signum, frame):
        raise Stop()

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t0 = time.monotonic()
        with pytest.raises(Stop):
            run_blocking(long_request())
        assert time.monotonic() - t0 < 10
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert seen == ["cancelled"]
