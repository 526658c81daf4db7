"""Code-execution verifier (`data.reward_fn: code`): the response's code against the record's tests, sandboxed.

Record: `tests` = a list of
  * assert tests: a string of Python (`"assert add(1, 2) == 3"`) or `{"name", "code", "visible"}`; run after the
    solution, in (a copy of) its namespace;
  * I/O tests: `{"name", "input", "output", "visible"}`; the solution runs as `__main__` with `input` on stdin
    and must print `output` (compared line by line, trailing whitespace ignored).
`tests_visible: true` on the record marks every test visible. The code is the response's last ```python
fenced block (or the whole response when it has none). Each response runs in its own sandbox
(rewards/sandbox.py: CPU, wall, memory, output and process limits, no network, a scratch dir), `num_workers`
at a time. reward = the fraction of tests passed (`mode="fraction"`) or 1/0 all-pass (`mode="all"`).

The message names the first failing test: for a visible test its assertion / traceback (clipped); for a hidden
one only the exception raised inside the solution (`failed hidden test 'neg': AssertionError`), never the
test's source or expected output. A killed run says which limit and during which test.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from rfpo_megatron.rewards.base import OutcomeScorer, RewardResult, ScoreItem
from rfpo_megatron.rewards.sandbox import SandboxLimits, SandboxResult, run_sandboxed

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
MODES = ("fraction", "all")
BUNDLED_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code_tasks.jsonl")


def extract_code(response_text: str) -> str:
    """The last fenced code block of the response (an unclosed one runs to the end), else the whole text."""
    blocks = _FENCE.findall(response_text or "")
    return (blocks[-1] if blocks else (response_text or "")).strip("\n")


def check_record(record: dict[str, Any]) -> Optional[str]:
    """None when `record['tests']` is usable, else "field 'tests' ..." (for `rfpo-megatron data check`)."""
    tests = record.get("tests")
    if not isinstance(tests, list) or not tests:
        return "field 'tests' missing or empty; expected a list of assert strings or {name, code | input, output}"
    for i, t in enumerate(tests):
        if isinstance(t, str):
            continue
        if not isinstance(t, dict):
            return f"field 'tests'[{i}] is a {type(t).__name__}; expected a string or an object"
        if not isinstance(t.get("code"), str) and not ("input" in t or "output" in t):
            return f"field 'tests'[{i}] has neither 'code' (a string) nor 'input'/'output'"
        if "name" in t and not isinstance(t["name"], str):
            return f"field 'tests'[{i}].name is a {type(t['name']).__name__}; expected a string"
    return None


def normalize_tests(record: dict[str, Any]) -> list[dict]:
    """The record's tests as [{name, code | input, output, visible}] (names default to test_<i>)."""
    problem = check_record(record)
    if problem:
        raise ValueError(f"record '{record.get('id', '?')}': {problem}")
    all_visible = bool(record.get("tests_visible", False))
    out = []
    for i, t in enumerate(record["tests"]):
        t = {"code": t} if isinstance(t, str) else dict(t)
        t["name"] = str(t.get("name") or f"test_{i}")
        t["visible"] = bool(t.get("visible", all_visible))
        out.append(t)
    return out


def _killed_message(res: SandboxResult, limits: SandboxLimits, running: Optional[str]) -> str:
    during = f" during test '{running}'" if running else " while loading the code"
    return {"timeout": f"killed at the wall-time limit ({limits.wall_s:g}s){during}",
            "cpu_limit": f"killed at the CPU-time limit ({limits.cpu_s:g}s){during}",
            "output_limit": f"output limit ({limits.max_output_bytes} bytes) exceeded{during}",
            "memory_limit": f"memory limit ({limits.memory_mb} MB) exceeded{during}",
            }.get(res.status, f"the program crashed (exit status {res.returncode}){during}")


def score_result(res: SandboxResult, tests: list[dict], mode: str, limits: SandboxLimits) -> RewardResult:
    """Reward and message from one sandbox run of a solution against `tests`."""
    done = {e["test"]: e for e in res.events if "test" in e}
    started = [e["start"] for e in res.events if "start" in e]
    load = next((e for e in res.events if "load_error" in e), None)
    n = len(tests)
    passed = sum(1 for e in done.values() if e.get("ok"))
    reward = passed / n if mode == "fraction" else float(passed == n)
    if load is not None:
        if load.get("kind") in ("MemoryError", "OutputLimit"):
            return RewardResult(0.0, _killed_message(res, limits, None))
        return RewardResult(0.0, f"the code raised when run: {load['load_error']}")
    first_bad = next((i for i in range(n) if not done.get(i, {}).get("ok", False)), None)
    if first_bad is None:
        return RewardResult(reward, "")
    t, e = tests[first_bad], done.get(first_bad)
    prefix = f"passed {passed}/{n} tests; "
    if e is not None and e.get("kind") in ("MemoryError", "OutputLimit"):  # a limit hit inside this test
        return RewardResult(reward, prefix + _killed_message(res, limits, t["name"]))
    if e is None:  # never finished: killed during the last test started
        running = tests[started[-1]]["name"] if started and started[-1] < n else None
        if res.status == "ok":
            return RewardResult(reward, prefix + f"test '{t['name']}' did not run (the program exited early)")
        return RewardResult(reward, prefix + _killed_message(res, limits, running))
    hidden = "" if t["visible"] else "hidden "
    detail = e.get("detail") or e.get("kind") or "failed"
    return RewardResult(reward, prefix + f"failed {hidden}test '{t['name']}': {detail}")


class CodeVerifier(OutcomeScorer):
    """`score_batch` runs each response in its own sandbox, `num_workers` at a time (threads waiting on
    subprocesses; they end with the call). kwargs: mode, num_workers and the SandboxLimits fields; `network` /
    `processes` force a containment mode (sandbox.containment())."""

    def __init__(self, mode: str = "fraction", num_workers: Optional[int] = None, wall_s: float = 10.0,
                 cpu_s: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 1 << 20, max_procs: int = 16,
                 network: Optional[str] = None, processes: Optional[str] = None):
        if mode not in MODES:
            raise ValueError(f"code reward: mode '{mode}' is not one of {list(MODES)}")
        self.mode = mode
        self.num_workers = max(1, int(num_workers or min(8, os.cpu_count() or 1)))
        self.limits = SandboxLimits(float(wall_s), float(cpu_s), int(memory_mb), int(max_output_bytes),
                                    int(max_procs))
        self.network, self.processes = network, processes

    def _one(self, item: ScoreItem) -> RewardResult:
        resp, _, rec = item
        tests = normalize_tests(rec)
        code = extract_code(resp)
        if not code.strip():
            return RewardResult(0.0, "no code found in the response (put it in a ```python block)")
        res = run_sandboxed(code, tests, self.limits, self.network, self.processes)
        return score_result(res, tests, self.mode, self.limits)

    def _safe_one(self, item: ScoreItem) -> Any:
        try:
            return self._one(item)
        except Exception as exc:  # a bad record: that item's error (rewards.guard applies the policy)
            return exc

    def score_outcomes(self, items: Sequence[ScoreItem]) -> list[Any]:
        """One RewardResult or exception per item, in order."""
        items = list(items)
        if len(items) <= 1 or self.num_workers == 1:
            return [self._safe_one(it) for it in items]
        with ThreadPoolExecutor(max_workers=min(self.num_workers, len(items)),
                                thread_name_prefix="rfpo-code-reward") as ex:
            return list(ex.map(self._safe_one, items))

