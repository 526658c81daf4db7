"""Code-execution verifier (`data.reward_fn: code`): real sandboxed subprocesses, limits enforced by the kernel
where the host allows (network namespace, pids cgroup / RLIMIT_NPROC), else by the audit hook."""
from __future__ import annotations

import json
import os
import socket
import time

import psutil
import pytest

from rfpo_megatron.config import load_config
from rfpo_megatron.rewards import build_reward
from rfpo_megatron.rewards.code_exec import BUNDLED_TASKS, CodeVerifier, check_record, extract_code
from rfpo_megatron.rewards.sandbox import SandboxLimits, containment, run_sandboxed

TASKS = {json.loads(line)["id"]: json.loads(line) for line in open(BUNDLED_TASKS)}
ADD = TASKS["code-add"]
FAST = dict(wall_s=6.0, cpu_s=2.0, memory_mb=256, max_procs=8)


def _v(**kw):
    return CodeVerifier(**{**FAST, **kw})


def _children():
    return {c.pid for c in psutil.Process().children(recursive=True)}


def test_bundled_reference_solutions_pass_and_records_check():
    recs = list(TASKS.values())
    assert len(recs) >= 8 and all(check_record(r) is None for r in recs)
    out = _v().score_batch([(f"Here:\n```python\n{r['answer']}```\n", "", r) for r in recs])
    assert [(x.reward, x.message) for x in out] == [(1.0, "")] * len(recs)


def test_wrong_code_names_the_failing_test_hidden_values_never_shown():
    v = _v()
    visible_fail = v.score("def add(a, b):\n    return a - b", "", ADD)  # fails 'small' (visible) and 'negative'
    assert visible_fail.reward == pytest.approx(1 / 3)  # passes only 'zero': 0 - 0 == 0
    assert visible_fail.message.startswith("passed 1/3 tests; failed test 'small': AssertionError")
    assert "assert add(1, 2) == 3" in visible_fail.message  # a visible test's assertion is shown
    hidden_fail = v.score("def add(a, b):\n    return abs(a) + b", "", ADD)  # passes 'small', 'zero'
    assert hidden_fail.reward == pytest.approx(2 / 3)
    assert hidden_fail.message == "passed 2/3 tests; failed hidden test 'negative': AssertionError"
    assert "-3" not in hidden_fail.message and "-5" not in hidden_fail.message
    all_mode = _v(mode="all").score("def add(a, b):\n    return abs(a) + b", "", ADD)
    assert all_mode.reward == 0.0
    crash = v.score("def add(a, b):\n    return a / 0", "", ADD)
    assert crash.reward == 0.0 and "failed test 'small': ZeroDivisionError: division by zero" in crash.message
    io = v.score("n = int(input())\nprint(n)", "", TASKS["code-fizzbuzz"])
    assert io.reward == 0.0 and io.message.startswith("passed 0/2 tests; failed test 'n5': expected output")


def test_extract_code():
    assert extract_code("text\n```python\nx = 1\n```\nmore\n```py\ny = 2\n```") == "y = 2"
    assert extract_code("x = 3") == "x = 3"
    assert extract_code("```python\nz = 4\n") == "z = 4"  # an unclosed (truncated) block


def test_infinite_loop_is_killed_at_the_limit():
    t0 = time.monotonic()
    r = _v(wall_s=3.0, cpu_s=1.0).score("def add(a, b):\n    while True:\n        pass", "", ADD)
    took = time.monotonic() - t0
    assert r.reward == 0.0 and took < 3.0 + 2.0, took
    assert ("CPU-time limit (1s) during test 'small'" in r.message
            or "wall-time limit (3s) during test 'small'" in r.message), r.message


def test_memory_bomb_is_stopped():
    r = _v(memory_mb=200).score("def add(a, b):\n    x = bytearray(2 * 1024 ** 3)\n    return a + b", "", ADD)
    assert r.reward == 0.0 and "memory limit (200 MB) exceeded during test 'small'" in r.message, r.message
    grow = _v(memory_mb=200).score("x = []\nwhile True:\n    x.append(' ' * 10 ** 6)", "", ADD)
    assert grow.reward == 0.0 and "memory limit (200 MB) exceeded" in grow.message, grow.message


@pytest.mark.parametrize("network", [None, "audit"])
def test_network_is_refused(network):
    """A real listener on loopback: the sandboxed connect fails and the listener never sees a connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    code = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ndef add(a, b):\n    return a + b"
    try:
        r = _v(network=network).score(code, "", ADD)
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()
    assert r.reward == 0.0 and r.message.startswith("the code raised when run:"), r.message
    expect = "not allowed" if (network or containment()["network"]) == "audit" else "Network is unreachable"
    assert expect in r.message, r.message


FORK_BOMB = """import os, time
n = 0
for _ in range(300):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    n += 1
print(n, flush=True)
def add(a, b):
    return a + b
"""


def test_fork_bomb_is_contained_and_cleaned_up():
    before = _children()
    res = run_sandboxed(FORK_BOMB, [{"code": "assert add(1, 2) == 3"}], SandboxLimits(wall_s=10, cpu_s=3, max_procs=8))
    mode = containment()["processes"]
    if mode == "audit":
        assert "not allowed" in json.dumps(res.events)
    else:
        forked = int(res.stdout.split()[0])
        assert forked < 8, forked  # the harness itself counts against max_procs
    assert _children() == before
    time.sleep(0.2)
    assert not [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(60)" in " ".join(p.info["cmdline"] or [])]


def test_output_limit():
    r = _v(max_output_bytes=10_000).score("print('x' * 100_000)\ndef add(a, b):\n    return a + b", "", ADD)
    assert r.reward == 0.0 and "output limit (10000 bytes) exceeded" in r.message, r.message


def test_64_samples_in_parallel_without_leaking_processes():
    v = build_reward(load_config(None, ["data.reward_fn=code",
                                        "data.reward_kwargs={num_workers: 8, wall_s: 20, memory_mb: 256}"]).data)
    good, bad = "def add(a, b):\n    return a + b", "def add(a, b):\n    return 0"
    items = [(good if i % 4 else bad, "", {**ADD, "id": f"s{i}"}) for i in range(64)]
    before, scratch_before = _children(), set(os.listdir("/tmp"))
    t0 = time.monotonic()
    out = v.score_batch(items)
    took = time.monotonic() - t0
    assert [r.reward for r in out] == [1.0 if i % 4 else pytest.approx(1 / 3) for i in range(64)]  # bad passes 'zero'
    assert _children() == before
    assert not [d for d in set(os.listdir("/tmp")) - scratch_before if d.startswith("rfpo-sbx-")]
    assert took < 60, took
