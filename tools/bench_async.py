"""Step wall time of trainer.async_mode off vs one_step with a deterministic slow engine and a slow actor.

    PYTHONPATH=. python tools/bench_async.py [--steps 6] [--decode-sleep 0.1] [--train-sleep 1.0] [--json]

Two real trainer runs on a tiny random Qwen2 (built under --out) with the embedded engine in its own process:
the engine sleeps --decode-sleep s per decode step (env RFPO_EMBEDDED_DECODE_SLEEP_S), every optimizer step
sleeps --train-sleep s first. Prints, per mode, the mean over steps 2.. of perf/step_time and its parts
(rollout + fix on the rollout side, train, weight sync) and the ratio one_step / off, next to the two
predictions sum = rollout + train + sync (synchronous) and max(rollout, train) + sync (overlapped).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_assets(root: str) -> dict:
    """A tiny random Qwen2 + the char tokenizer + 16 addition prompts (as the trainer tests use)."""
    sys.path.insert(0, os.path.join(ROOT, "examples", "tiny_cpu"))
    import torch
    from transformers import Qwen2ForCausalLM

    from rfpo_megatron.rewards.addition import make_split, write_jsonl
    from tiny_assets import build_tokenizer, tiny_qwen2_config

    model_dir, data = os.path.join(root, "model"), os.path.join(root, "train.jsonl")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        tok = build_tokenizer(model_dir)
        torch.manual_seed(0)
        cfg = tiny_qwen2_config(tok, hidden=32, layers=2, heads=4, kv_heads=2, max_pos=256)
        cfg.intermediate_size = 64
        Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    if not os.path.isfile(data):
        write_jsonl(data, make_split(16, [1], seed=1, prefix="tr"))
    return {"model": model_dir, "train": data}


def run_mode(mode: str, assets: dict, out: str, steps: int, decode_sleep: float, train_sleep: float) -> list[dict]:
    """One trainer run (a child process of this script); returns its metrics records."""
    shutil.rmtree(out, ignore_errors=True)
    kv = {"actor.hf_model_path": assets["model"], "actor.micro_batch_size": 16, "actor.lr": 1e-3,
          "actor.use_distributed_optimizer": "false", "rollout.n_samples": 4, "rollout.max_new_tokens": 8,
          "rollout.colocate": "false", "data.train_files": f"[{assets['train']}]", "data.eval_files": "[]",
          "data.reward_fn": "arithmetic", "data.prompts_per_step": 4, "rfpo.fix.variant": "reference",
          "rfpo.fix.attempts": 1, "rfpo.fix.max_per_group": 1, "algo.max_response_len": 8,
          "logging.log_dir": os.path.join(out, "logs"), "logging.wandb_mode": "disabled",
          "trainer.steps": steps, "trainer.save_interval": 0, "trainer.save_dir": os.path.join(out, "ckpt"),
          "trainer.async_mode": mode}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RFPO_EMBEDDED_DECODE_SLEEP_S": str(decode_sleep),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(train_sleep),
           os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml"), *[f"{k}={v}" for k, v in kv.items()]]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if p.returncode != 0:
        raise SystemExit(f"trainer ({mode}) failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    from rfpo_megatron.logging import read_metrics

    return read_metrics(os.path.join(out, "logs", "metrics.jsonl"))


def summarize(records: list[dict]) -> dict:
    """Means over steps 2.. (step 1 has no overlap and pays start-up costs)."""
    rows = [r for r in records if r["step"] >= 2] or records

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    rollout = mean("perf/rollout_time") + mean("perf/fix_time")
    train, sync = mean("perf/train_time"), mean("perf/weight_sync_time")
    return {"step": mean("perf/step_time"), "rollout": rollout, "train": train, "sync": sync,
            "sum": rollout + train + sync, "overlap": max(rollout, train) + sync,
            "staleness_max": max(r.get("rollout/staleness_max", 0.0) for r in rows),
            "partial_frac": mean("rollout/partial_frac")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--decode-sleep", type=float, default=0.1, help="engine seconds per decode step")
    p.add_argument("--train-sleep", type=float, default=1.0, help="actor seconds per optimizer step")
    p.add_argument("--out", default="outputs/bench_async")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    a = p.parse_args(argv)
    assets = build_assets(os.path.join(a.out, "assets"))
    res = {}
    for mode in ("off", "one_step"):
        t0 = time.time()
        res[mode] = summarize(run_mode(mode, assets, os.path.join(a.out, mode), a.steps, a.decode_sleep, a.train_sleep))
        res[mode]["wall"] = time.time() - t0
    res["ratio"] = res["one_step"]["step"] / res["off"]["step"]
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"decode sleep {a.decode_sleep}s/token, train sleep {a.train_sleep}s/step, {a.steps} steps (means of 2..)")
    print("| mode | step s | rollout+fix s | train s | sync s | sum s | max(rollout, train)+sync s | staleness max | partial |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in ("off", "one_step"):
        r = res[mode]
        print(f"| {mode} | {r['step']:.2f} | {r['rollout']:.2f} | {r['train']:.2f} | {r['sync']:.2f} | {r['sum']:.2f} "
              f"| {r['overlap']:.2f} | {r['staleness_max']:.0f} | {r['partial_frac']:.2f} |")
    print(f"one_step / off step time: {res['ratio']:.2f}")
    return 0


def child(argv: list[str]) -> int:
    """The trainer with every optimizer step sleeping argv[0] seconds first (the slow actor)."""
    import torch

    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.trainer import main as train_main

    torch.set_num_threads(1)
    pause, real = float(argv[0]), Actor.train_step

    def slow(self, *a, **kw):
        time.sleep(pause)
        return real(self, *a, **kw)

    Actor.train_step = slow
    return train_main(argv[1:])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
