"""Step benchmark: the project's trainer on a given shape, per-stage medians, tokens/s, fraction of a measured peak.

    python tools/bench_step.py [--hidden 128 --layers 4 --heads 4 --kv-heads 2 --prompts 8 --samples 8
                                --max-new-tokens 24 --warmup 2 --steps 3 --skip-old-logprob-pass both]
    rfpo-megatron bench --step [same options]

Builds a random tied Qwen2 (char tokenizer of examples/tiny_cpu/tiny_assets.py) and addition prompts in a
work dir, then runs the real trainer step (`trainer.train_one_step`: rollout on the embedded engine, fix stage
with --rfpo, old-log-prob pass, train step, weight sync; `--eval`: the trainer's eval too) `warmup + steps`
times and prints the medians over the measured steps of the trainer's perf/* timings plus sub-stages measured
by wrapping (never changing) the calls: rollout = engine generate (client call: HTTP + generation) + reward
+ rest (queue, grouping); train = forward+backward (megatron schedule) + optimizer + rest; weight sync
(tensor mode) = payload (shared-memory file or base64) + engine load (the HTTP call) + rest (HF export,
update session, flush, the colocated release / resume). Then the ratios to the references: plain HF
generate, plain PyTorch train and (--trl) TRL's GRPOTrainer (rfpo_megatron.bench_baselines).

Model FLOPs: 2·P per token for a forward (rollout prefill/decode, log-prob pass), 6·P for a train token (P =
all parameters, embeddings included; attention's T² term ignored). The machine's peak is a timed float32
matmul (best of a few 2048³ products with torch's current thread count). TRL's GRPOTrainer on the same model
and shape runs with --trl when `import trl` works (an optional extra, never a dependency: `make bench-trl`
builds a separate .venv-trl with it). The references (plain HF generate, plain PyTorch train, TRL) run in a
child process without megatron's CPU redirect (rfpo_megatron.bench_baselines).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

import torch

STAGES = [  # (label, metric key); sub-stages are indented
    ("rollout", "perf/rollout_time"),
    ("  generate (engine call)", "bench/generate_time"),
    ("  reward", "bench/reward_time"),
    ("  rest (queue, grouping)", "bench/rollout_rest_time"),
    ("fix stage", "perf/fix_time"),
    ("log-prob (old + ref)", "perf/logprob_time"),
    ("train", "perf/train_time"),
    ("  forward+backward", "bench/fwd_bwd_time"),
    ("  optimizer", "bench/optimizer_time"),
    ("  rest", "bench/train_rest_time"),
    ("weight sync", "perf/weight_sync_time"),
    ("  payload (shm file / base64)", "bench/sync_payload_time"),
    ("  engine load (HTTP call)", "bench/sync_load_time"),
    ("  rest (export, session, flush)", "bench/sync_rest_time"),
    ("eval", "perf/eval_time"),
    ("step", "perf/step_time"),
]
BREAKDOWN_KEYS = [k for _, k in STAGES]


def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` float32 [n, n] @ [n, n] products (2·n³ FLOPs each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def build_assets(root: str, hidden: int, layers: int, heads: int, kv_heads: int, n_train: int) -> dict:
    """Random tied Qwen2 + char tokenizer + addition prompts under `root` (rebuilt only when missing)."""
    from transformers import Qwen2ForCausalLM

    from rfpo_megatron.rewards.addition import make_split, write_jsonl

    ex = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "tiny_cpu")
    if not os.path.isfile(os.path.join(ex, "tiny_assets.py")):
        raise SystemExit(f"bench --step: needs the repository's examples/tiny_cpu/tiny_assets.py (not at {ex})")
    sys.path.insert(0, ex)
    from tiny_assets import build_tokenizer, tiny_qwen2_config

    model_dir = os.path.join(root, f"model_h{hidden}_l{layers}_a{heads}_{kv_heads}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        tok = build_tokenizer(model_dir)
        torch.manual_seed(0)
        cfg = tiny_qwen2_config(tok, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, max_pos=512)
        Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    train = os.path.join(root, f"train_{n_train}.jsonl")
    if not os.path.isfile(train):
        write_jsonl(train, make_split(n_train, [1, 2], seed=1, prefix="b"))
    return {"model": model_dir, "train": train}


def overrides(args: argparse.Namespace, assets: dict, out: str, skip: str) -> list[str]:
    kv = {
        "actor.hf_model_path": assets["model"], "actor.lr": args.lr, "actor.use_distributed_optimizer": False,
        "actor.lr_decay_style": "constant",
        "rollout.n_samples": args.samples, "rollout.max_new_tokens": args.max_new_tokens, "rollout.temperature": 1.0,
        "data.train_files": f"[{assets['train']}]", "data.eval_files": f"[{assets['train']}]" if args.eval else "[]",
        "data.reward_fn": "arithmetic", "data.prompts_per_step": args.prompts, "data.max_prompt_len": 256,
        "algo.adv_estimator": "grpo", "algo.use_kl_loss": False, "algo.use_kl_in_reward": False,
        "algo.max_response_len": args.max_new_tokens,
        "rfpo.enabled": bool(args.rfpo), "rfpo.fix.variant": "reference", "rfpo.fix.attempts": 1,
        "logging.log_dir": os.path.join(out, "logs"), "logging.wandb_mode": "disabled", "logging.console": False,
        "trainer.steps": args.warmup + args.steps, "trainer.seed": 1, "trainer.save_interval": 0,
        "trainer.save_dir": os.path.join(out, "ckpt"), "trainer.skip_old_logprob_pass": skip,
        "trainer.eval_n_samples": 1,
    }
    return [f"{k}={v}" for k, v in kv.items()] + list(args.override)


class _Wrapped:
    """Times calls of obj.name into the current step's metrics under `key` (accumulated); undo() restores."""

    def __init__(self, obj: Any, name: str, key: str, sink: dict, pred=None):
        self.obj, self.name, self.real = obj, name, getattr(obj, name)
        real = self.real

        def wrapper(*a, **kw):
            if pred is not None and not pred(a, kw):
                return real(*a, **kw)
            t0 = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                sink[key] = sink.get(key, 0.0) + time.perf_counter() - t0

        setattr(obj, name, wrapper)

    def undo(self) -> None:
        setattr(self.obj, self.name, self.real)


def run_trainer(args: argparse.Namespace, assets: dict, skip: str) -> dict:
    """warmup + steps real trainer steps; returns {"steps": [metrics...] (measured ones), "params": P, ...}."""
    import rfpo_megatron.actor.actor as actor_mod
    import rfpo_megatron.train.generation as gen_mod
    from rfpo_megatron.config import load_config
    from rfpo_megatron.train.generation import run_eval
    from rfpo_megatron.train.lifecycle import setup, teardown
    from rfpo_megatron.trainer import train_one_step

    out = tempfile.mkdtemp(prefix=f"bench_step_{skip}_", dir=args.work_dir)
    cfg = load_config(None, overrides(args, assets, out, skip))
    rt = setup(cfg)
    sink: dict = {}
    wraps = []
    try:
        params = sum(p.numel() for m in rt.actor.model for p in m.parameters())
        captured: dict = {}
        real_train = rt.actor.train_step

        @functools.wraps(real_train)  # keeps the signature the trainer inspects (old_logp_from_forward)
        def capture_train(batch, *a, **kw):
            captured["batch"] = batch
            return real_train(batch, *a, **kw)

        rt.actor.train_step = capture_train
        wraps = [_Wrapped(rt.engine, "generate", "bench/generate_time", sink),
                 _Wrapped(gen_mod, "score_samples", "bench/reward_time", sink),
                 _Wrapped(actor_mod, "run_schedule", "bench/fwd_bwd_time", sink,
                          pred=lambda a, kw: kw.get("forward_only") is False),
                 _Wrapped(rt.actor.optimizer, "step", "bench/optimizer_time", sink),
                 _Wrapped(rt.engine, "tensor_payloads", "bench/sync_payload_time", sink),
                 _Wrapped(rt.engine, "update_weights_from_tensors", "bench/sync_call_time", sink)]
        rows, prev_total = [], 0.0
        for step in range(1, args.warmup + args.steps + 1):
            sink.clear()
            m = train_one_step(rt, step)
            rt.step = step
            if args.eval:
                m.update(run_eval(rt, step))
            m.update(sink)
            m["bench/rollout_rest_time"] = (m.get("perf/rollout_time", 0.0) - m.get("bench/generate_time", 0.0)
                                           - m.get("bench/reward_time", 0.0))
            if "bench/sync_call_time" in m:  # the call = payload + the HTTP round trip with the engine's load
                m["bench/sync_load_time"] = m.pop("bench/sync_call_time") - m.get("bench/sync_payload_time", 0.0)
                m["bench/sync_rest_time"] = (m.get("perf/weight_sync_time", 0.0) - m["bench/sync_load_time"]
                                             - m.get("bench/sync_payload_time", 0.0))
            m["bench/train_rest_time"] = (m.get("perf/train_time", 0.0) - m.get("bench/fwd_bwd_time", 0.0)
                                         - m.get("bench/optimizer_time", 0.0))
            total = m.get("rollout/generated_tokens_total", 0.0)
            m["bench/generated_tokens"], prev_total = total - prev_total, total
            rows.append(m)
            print(f"  [{skip}] step {step}{' (warm-up)' if step <= args.warmup else ''}: "
                  f"{m['perf/step_time']:.3f} s", flush=True)
        return {"steps": rows[args.warmup:], "params": int(params), "batch": captured.get("batch"),
                "micro_batch_size": int(cfg.actor.micro_batch_size)}
    finally:
        for w in wraps:
            w.undo()
        teardown(rt)


def summarize(res: dict, peak: float) -> dict:
    """Medians of the breakdown keys over the measured steps, tokens/s and the achieved FLOP fractions."""
    rows, P = res["steps"], res["params"]
    med = {k: statistics.median([r[k] for r in rows]) for k in BREAKDOWN_KEYS if all(k in r for r in rows)}
    gen_tok = statistics.median([r["bench/generated_tokens"] for r in rows])
    train_tok = statistics.median([r["perf/train_tokens"] for r in rows])  # prompt + response tokens of the batch
    med["step_min"] = min(r["perf/step_time"] for r in rows)  # robust to a shared box's bursts
    med["tokens_per_s"] = statistics.median([r["perf/tokens_per_s"] for r in rows])
    med["train_tokens"] = train_tok
    med["generated_tokens"] = gen_tok
    med["params"] = P
    med["peak_flops"] = peak
    skipped = statistics.median([r.get("perf/old_logprob_pass_skipped", 0.0) for r in rows])
    med["old_logprob_pass_skipped"] = skipped
    flops = {"train": 6.0 * P * train_tok}
    if "perf/logprob_time" in med:  # the full pass scores the N rows (skipped: only R_off's rows; ~0 for GRPO)
        flops["log-prob"] = 0.0 if skipped else 2.0 * P * train_tok
    if gen_tok:
        flops["rollout"] = 2.0 * P * gen_tok  # decode only (prefill of the prompts not counted)
    frac = {"train": flops["train"] / max(med["perf/train_time"], 1e-12) / peak}
    if flops.get("log-prob"):
        frac["log-prob"] = flops["log-prob"] / max(med["perf/logprob_time"], 1e-12) / peak
    if "rollout" in flops:
        frac["rollout"] = flops["rollout"] / max(med["perf/rollout_time"], 1e-12) / peak
    frac["step"] = sum(flops.values()) / max(med["perf/step_time"], 1e-12) / peak
    med["flop_fraction"] = frac
    return med


def format_table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = ["| stage (median s) | " + " | ".join(f"old-logp pass {n}" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for label, key in STAGES:
        cells = [f"{results[n][key]:.4f}" if key in results[n] else "n/a" for n in names]
        lines.append(f"| {label.replace('  ', '&nbsp;&nbsp;')} | " + " | ".join(cells) + " |")
    lines.append("| tokens/s (prompt+response / step) | " + " | ".join(f"{results[n]['tokens_per_s']:.0f}" for n in names) + " |")
    for part in ("rollout", "log-prob", "train", "step"):
        cells = [f"{100 * results[n]['flop_fraction'][part]:.2f} %" if part in results[n]["flop_fraction"] else "n/a"
                 for n in names]
        lines.append(f"| achieved FLOP/s fraction, {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rfpo-megatron bench --step", description=__doc__.splitlines()[0])
    p.add_argument("--step", action="store_true", help=argparse.SUPPRESS)  # `rfpo-megatron bench --step`
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (not in the medians)")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--rfpo", action="store_true", help="RFPO (fix stage on) instead of plain GRPO")
    p.add_argument("--eval", action="store_true", help="also run the trainer's eval after each step (timed)")
    p.add_argument("--skip-old-logprob-pass", choices=["auto", "false", "both"], default="both",
                   help="trainer.skip_old_logprob_pass of the run(s); both: one run each")
    p.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer (when installed)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the plain in-process HF generate / PyTorch train references (bench_baselines)")
    p.add_argument("--work-dir", default=None, help="where the model/data/run dirs go (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the summaries to this JSON file")
    p.add_argument("override", nargs="*", help="extra section.key=value config overrides")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads())
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_step_")
    os.makedirs(args.work_dir, exist_ok=True)
    assets = build_assets(args.work_dir, args.hidden, args.layers, args.heads, args.kv_heads,
                          max(64, args.prompts * (args.warmup + args.steps)))
    peak = matmul_peak_flops()
    print(f"shape: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, tied; "
          f"{args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens; "
          f"{'RFPO' if args.rfpo else 'GRPO'}, beta 0; torch threads {torch.get_num_threads()}; "
          f"{args.warmup} warm-up + {args.steps} measured steps")
    print(f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    modes = ["false", "auto"] if args.skip_old_logprob_pass == "both" else [args.skip_old_logprob_pass]
    results, raw = {}, {}
    for mode in modes:
        raw[mode] = run_trainer(args, assets, mode)
        results[mode] = summarize(raw[mode], peak)
    P = next(iter(results.values()))["params"]
    print(f"params: {P / 1e6:.3f} M; median over measured steps:")
    print(format_table(results))
    for mode, r in results.items():
        print(f"old-logp pass {mode}: skipped={bool(r['old_logprob_pass_skipped'])}, step {r['perf/step_time']:.4f} s "
              f"(min {r['step_min']:.4f} s), "
              f"{r['tokens_per_s']:.0f} tokens/s, generated tokens/step {r['generated_tokens']}")
    base = baselines(args, assets, raw[modes[-1]]) if (args.baselines or args.trl) else {}
    if not args.trl:
        print("TRL comparison: not requested (--trl; needs `import trl`)")
    if base:
        print(format_targets(results[modes[-1]], base, modes[-1]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"peak_flops": peak, "results": results, "baselines": base}, fh, indent=1)
    return 0


def baselines(args: argparse.Namespace, assets: dict, res: dict) -> dict:
    """The plain in-process references (rfpo_megatron.bench_baselines) on the last measured step's batch, and
    TRL's GRPOTrainer with --trl, in a fresh child process: this one has megatron's CPU redirect active, which
    would slow every torch call of the references (and flatter the ratios)."""
    import subprocess

    batch = res.get("batch")
    if batch is None:
        return {}
    path = os.path.join(args.work_dir, "bench_batch.pt")
    torch.save({"input_ids": batch.input_ids, "prompt_lens": batch.prompt_lens, "advantages": batch.advantages}, path)
    out = os.path.join(args.work_dir, "bench_baselines.json")
    cmd = [sys.executable, "-m", "rfpo_megatron.bench_baselines", "--model", assets["model"], "--batch", path,
           "--max-new-tokens", str(args.max_new_tokens), "--micro-batch-size", str(res["micro_batch_size"]),
           "--lr", str(args.lr), "--reps", str(max(3, args.steps)), "--json", out]
    if not args.baselines:
        cmd.append("--no-plain")
    if args.trl:
        cmd += ["--trl", "--train-file", assets["train"], "--samples", str(args.samples), "--prompts", str(args.prompts),
                "--warmup", str(args.warmup), "--steps", str(args.steps), "--work-dir", args.work_dir]
    print("references (child process): " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), timeout=3600)
    if r.returncode != 0:
        print(f"references: the child process failed (exit {r.returncode}); no ratios")
        return {}
    with open(out) as fh:
        return json.load(fh)


def format_targets(r: dict, base: dict, mode: str) -> str:
    """Issue 18's ratios, each with its target; generate is also compared per generated token (EOS differs)."""
    lines = [f"| ratio (old-logp pass {mode}) | measured | target |", "|---|---|---|"]
    if "generate" in base:
        per_tok = (r["perf/rollout_time"] / max(r["generated_tokens"], 1)) / (base["generate"] / max(base["generate_tokens"], 1))
        lines.append(f"| rollout / plain HF generate | {r['perf/rollout_time'] / base['generate']:.2f} "
                     f"(per generated token {per_tok:.2f}) | <= 1.10 |")
    if "train" in base:
        lines.append(f"| train / plain PyTorch fwd+bwd+AdamW | {r['perf/train_time'] / base['train']:.2f} | <= 1.30 |")
    lines.append(f"| weight sync / step | {100 * r.get('perf/weight_sync_time', 0.0) / r['perf/step_time']:.1f} % | <= 5 % |")
    if "trl_step" in base:
        lines.append(f"| step / TRL GRPOTrainer step ({base['trl_step']:.4f} s) | "
                     f"{r['perf/step_time'] / base['trl_step']:.2f} | <= 0.80 |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
