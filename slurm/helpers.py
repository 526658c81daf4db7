"""Small CLI helpers for the sbatch scripts: read config values, wait for HTTP health, check a finished run.

    python slurm/helpers.py get CONFIG.yaml [key=value ...] -- rollout.engine rollout.sglang_tp
    python slurm/helpers.py wait-http --timeout 600 http://node1:30000/health http://node1:30001/health
    python slurm/helpers.py check-run --log-dir D --save-dir S --expect-last-step 3 [--snapshot F] [--resumed-after 2]

`get` validates through rfpo_megatron.config (same errors as the trainer) and prints one value per line
(booleans as true/false, lists/dicts as JSON). Standard library only apart from that import.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def config_values(path: str, overrides: list[str], keys: list[str]) -> list[Any]:
    """Values of dotted ``keys`` in the validated config ``path`` + ``overrides``."""
    from rfpo_megatron.config import load_config, to_dict

    tree = to_dict(load_config(path, overrides))
    out = []
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise SystemExit(f"helpers get: config key {key!r} does not exist in {path}")
            node = node[part]
        out.append(node)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "" if v is None else str(v)


def wait_http(urls: list[str], timeout_s: float, interval_s: float = 2.0) -> list[str]:
    """Poll every URL until each answers HTTP 200; returns the ones still failing at the deadline."""
    pending = list(urls)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        still = []
        for u in pending:
            try:
                with urllib.request.urlopen(u, timeout=5) as r:
                    if r.status != 200:
                        still.append(u)
            except (urllib.error.URLError, OSError):
                still.append(u)
        pending = still
        if pending:
            time.sleep(interval_s)
    return pending


def read_steps(metrics_path: str) -> list[dict[str, Any]]:
    """The metrics.jsonl records (one JSON object per line, each with 'step')."""
    if not os.path.isfile(metrics_path):
        return []
    with open(metrics_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_run(log_dir: str, save_dir: str, expect_last_step: int, snapshot: str | None = None,
              resumed_after: int | None = None) -> list[str]:
    """Problems with a finished run (empty list = fine).

    - metrics.jsonl has steps 1..expect_last_step exactly once each, with finite numbers;
    - save_dir/latest names a checkpoint directory step_<expect_last_step> that exists and is not empty;
    - with ``resumed_after`` N and the ``snapshot`` written after the first job: the first N records are
      byte-for-byte the ones the first job wrote (same wall_time: they were not re-run from scratch).
    """
    problems: list[str] = []
    recs = read_steps(os.path.join(log_dir, "metrics.jsonl"))
    steps = [r.get("step") for r in recs]
    if steps != list(range(1, expect_last_step + 1)):
        problems.append(f"metrics.jsonl steps are {steps}, expected 1..{expect_last_step}")
    for r in recs:
        nums = [v for v in r.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if any(v != v or v in (float("inf"), float("-inf")) for v in nums):
            problems.append(f"step {r.get('step')}: non-finite metric")
    if recs and not any(k.startswith("train/") for k in recs[-1]):
        problems.append(f"last metrics record has no train/* metric: {sorted(recs[-1])[:8]}")
    latest = os.path.join(save_dir, "latest")
    if not os.path.isfile(latest):
        problems.append(f"no checkpoint: {latest} missing")
    else:
        name = open(latest).read().strip()
        ck = os.path.join(save_dir, os.path.basename(name))
        want = f"step_{expect_last_step:06d}"
        if os.path.basename(name) != want:
            problems.append(f"latest checkpoint is {name!r}, expected {want}")
        elif not os.path.isdir(ck) or not os.listdir(ck):
            problems.append(f"checkpoint directory {ck} missing or empty")
    if resumed_after is not None:
        if not snapshot or not os.path.isfile(snapshot):
            problems.append("resume check needs --snapshot of the first job's metrics.jsonl")
        else:
            first = read_steps(snapshot)
            if len(first) != resumed_after:
                problems.append(f"snapshot has {len(first)} records, expected {resumed_after}")
            elif recs[:resumed_after] != first:
                problems.append("records of the first job changed: the resumed job re-ran from scratch")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "get":
        if "--" not in rest:
            raise SystemExit("helpers get: usage: get CONFIG [key=value ...] -- KEY...")
        i = rest.index("--")
        path, overrides, keys = rest[0], rest[1:i], rest[i + 1:]
        for v in config_values(path, overrides, keys):
            print(_fmt(v))
        return 0
    if cmd == "wait-http":
        ap = argparse.ArgumentParser(prog="helpers wait-http")
        ap.add_argument("--timeout", type=float, default=600)
        ap.add_argument("urls", nargs="+")
        a = ap.parse_args(rest)
        left = wait_http(a.urls, a.timeout)
        for u in left:
            print(f"not healthy after {a.timeout:.0f}s: {u}", file=sys.stderr)
        return 1 if left else 0
    if cmd == "check-run":
        ap = argparse.ArgumentParser(prog="helpers check-run")
        ap.add_argument("--log-dir", required=True)
        ap.add_argument("--save-dir", required=True)
        ap.add_argument("--expect-last-step", type=int, required=True)
        ap.add_argument("--snapshot")
        ap.add_argument("--resumed-after", type=int)
        a = ap.parse_args(rest)
        problems = check_run(a.log_dir, a.save_dir, a.expect_last_step, a.snapshot, a.resumed_after)
        for p in problems:
            print(f"check-run: {p}", file=sys.stderr)
        if not problems:
            print(f"check-run: OK (steps 1..{a.expect_last_step}, checkpoint step_{a.expect_last_step:06d})")
        return 1 if problems else 0
    print(f"helpers: unknown command {cmd!r} (get | wait-http | check-run)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
