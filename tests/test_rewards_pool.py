"""Worker-process pool: order, per-item timeouts, worker death, exceptions, SIGALRM inside workers."""
import os
import signal
import threading
import time

import pytest

from rfpo_megatron.rewards.pool import ProcessPool


def _square_or_misbehave(x):
    if x == "sleep":
        time.sleep(60)
    if x == "die":
        os._exit(3)
    if x == "raise":
        raise KeyError("boom")
    return x * x


def _alarm_timeout(seconds):
    """Uses SIGALRM like math-verify's timeouts: works in a main thread only."""
    def handler(signum, frame):
        raise TimeoutError("alarm")
    signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        time.sleep(seconds + 5)
        return "no alarm"
    except TimeoutError:
        return "alarm fired"
    finally:
        signal.alarm(0)


@pytest.fixture(scope="module")
def pool():
    p = ProcessPool(_square_or_misbehave, num_workers=2, timeout_s=1.5)
    yield p
    p.close()


def test_order_and_values(pool):
    out = pool.map([(i,) for i in range(7)])
    assert [r.value for r in out] == [i * i for i in range(7)] and all(r.ok for r in out)
    assert pool.map([]) == []


def test_timeout_and_death_are_isolated(pool):
    t0 = time.monotonic()
    out = pool.map([(2,), ("sleep",), (3,), ("die",), ("raise",), (4,)])
    elapsed = time.monotonic() - t0
    assert [r.ok for r in out] == [True, False, True, False, False, True]
    assert [out[i].value for i in (0, 2, 5)] == [4, 9, 16]
    assert out[1].error.startswith("timeout after 1.5s")
    assert out[3].error == "worker died (exit code 3)"
    assert "KeyError" in out[4].error
    assert elapsed < 20, elapsed  # the sleeping item was killed, not waited for
    # the pool keeps working after replacing workers
    assert [r.value for r in pool.map([(5,), (6,)])] == [25, 36]
    assert pool.restarts >= 2


def test_signal_timeouts_work_in_workers_but_not_threads():
    with ProcessPool(_alarm_timeout, num_workers=1, timeout_s=20) as p:
        assert p.map([(1,)])[0].value == "alarm fired"
    err = []

    def in_thread():
        try:
            _alarm_timeout(1)
        except ValueError as e:  # signal only works in main thread of the main interpreter
            err.append(str(e))

    th = threading.Thread(target=in_thread)
    th.start()
    th.join()
    assert err and "main thread" in err[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        ProcessPool(_square_or_misbehave, num_workers=0)
