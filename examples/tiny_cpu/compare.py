"""GRPO vs RFPO on the tiny CPU task: same warm start, same seeds, same rollout budget; a markdown table and a plot.

    python examples/tiny_cpu/compare.py [--seeds 1 2 3] [--steps 100] [--methods rfpo grpo grpo_ds]
                                        [--parallel 2] [--out outputs/compare] [--warm-start DIR]
                                        [--pass-k 64] [key=value ...]
    python examples/tiny_cpu/compare.py --pool OUT1 OUT2 ... --out OUT   # one table over several warm starts

For each seed, RFPO runs `--steps` steps first; its rollout budget is the number of sampled responses it
generated, fix generations included (`rollout/generations_total`). The baselines then run until they have
spent the same budget (`trainer.max_generations`: they stop after the step that reaches it), so RFPO is not
credited with free fix samples: GRPO (`rfpo.enabled=false`) and, with `--methods ... grpo_ds`, GRPO with
DAPO's dynamic sampling (`algo.dynamic_sampling=true`: all-equal groups dropped and refilled; the refills
count against the budget) — the baseline peers pick for all-wrong groups. Both evaluate on the held-out easy and hard splits every
`--eval-interval` steps and at the end, with plain prompts only (no fix prompt): avg@k is the solve rate.

Writes <out>/compare.md (table: final hard/easy avg@k and pass@k, zero_group_frac, fix_success_rate, R_off
stats, budget, wall time; mean ± std over seeds), <out>/compare.png (hard-split solve rate and easy-split
accuracy vs generations, zero_group_frac, fix_success_rate and R_off over steps) and <out>/compare.json.
Needs the warm-started model: run `python examples/tiny_cpu/prepare.py` first (run_demo.sh does), or pass
`--warm-start DIR` (a prepare.py `--out` directory: its model/ and data/ replace the config's). `--pass-k K`
evaluates the warm start and every run's final checkpoint once more on the hard split with K samples per prompt
(`rfpo-megatron eval --k K`) and adds the pass@j curve (j = 1, 2, 4, ... K: the capability boundary).
`--pool` reads several compare.json files (one per warm start) and writes one table with mean ± std over every
(warm start, seed) pair.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def run_many(jobs: list[tuple], parallel: int) -> list[dict]:
    """run_one(*job) for each job, at most `parallel` at a time (threads waiting on subprocesses)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(lambda job: run_one(*job), jobs))


METHODS = {  # method -> its overrides (on top of the config and the command line's)
    "rfpo": ["rfpo.enabled=true"],
    "grpo": ["rfpo.enabled=false"],
    "grpo_ds": ["rfpo.enabled=false", "algo.dynamic_sampling=true"],
    # C3 (issue 20): the R_off weighting at equal fix data -- RFPO variants, each run for --steps like rfpo
    "rfpo_g0": ["rfpo.enabled=true", "rfpo.gamma=0.0"],
    "rfpo_faithful": ["rfpo.enabled=true", "rfpo.loss_form=faithful"],
    "rfpo_corrected": ["rfpo.enabled=true", "rfpo.loss_form=corrected"],
    "rfpo_guide": ["rfpo.enabled=true", "rfpo.offpolicy_shaping=guide"],
    "rfpo_luffy": ["rfpo.enabled=true", "rfpo.offpolicy_shaping=luffy"],
    "rfpo_wzero": ["rfpo.enabled=true", "rfpo.wrong_advantage=zero"],
    # the fix variants (issue 20 item 5); rfpo itself is the config's `reference`
    "rfpo_error_info": ["rfpo.enabled=true", "rfpo.fix.variant=[error_info]"],
    "rfpo_reward": ["rfpo.enabled=true", "rfpo.fix.variant=[reward]"],
    "rfpo_rewrite": ["rfpo.enabled=true", "rfpo.fix.variant=[rewrite]"],
}
LABELS = {"rfpo": "RFPO", "grpo": "GRPO", "grpo_ds": "GRPO + dynamic sampling", "rfpo_g0": "RFPO γ = 0 (naive)",
          "rfpo_faithful": "RFPO faithful", "rfpo_corrected": "RFPO corrected",
          "rfpo_guide": "RFPO Guide-style r/(r+c)", "rfpo_luffy": "RFPO LUFFY-style p/(p+0.1)",
          "rfpo_wzero": "RFPO wrong_advantage=zero", "rfpo_error_info": "RFPO fix: error_info",
          "rfpo_reward": "RFPO fix: reward", "rfpo_rewrite": "RFPO fix: rewrite"}
REUSE = False  # --reuse: a run whose directory holds a final checkpoint is read, not re-run
BASELINES = ("grpo", "grpo_ds")  # these get RFPO's rollout budget; every other method runs --steps steps


def run_one(method: str, seed: int, steps: int, out: str, config: str, eval_interval: int,
            overrides: list[str]) -> dict:
    """One training run as a subprocess; returns {"dir", "records", "wall_s"} (records from metrics.jsonl)."""
    run_dir = os.path.join(out, f"{method}_seed{seed}")
    args = [sys.executable, "-m", "rfpo_megatron.cli", "train", config, *METHODS[method], f"trainer.seed={seed}",
            f"trainer.steps={steps}", f"trainer.eval_interval={eval_interval}", "trainer.save_interval=0",
            f"trainer.save_dir={run_dir}/ckpt", f"logging.log_dir={run_dir}/logs", "logging.wandb_mode=disabled",
            f"logging.run_name={method}_seed{seed}", *overrides]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    t0 = time.time()
    from rfpo_megatron.logging import read_metrics

    metrics = os.path.join(run_dir, "logs", "metrics.jsonl")
    if REUSE and os.path.isfile(os.path.join(run_dir, "ckpt", "latest")) and os.path.isfile(metrics):
        print(f"[compare] {method} seed {seed}: reusing the finished run in {run_dir} (--reuse)", flush=True)
        recs = read_metrics(metrics)
        return {"dir": run_dir, "records": recs, "wall_s": float("nan")}
    print(f"[compare] {method} seed {seed}: {steps} steps -> {run_dir}", flush=True)
    with open(os.path.join(out, f"{method}_seed{seed}.log"), "w") as log:
        rc = subprocess.call(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"[compare] {method} seed {seed} failed (rc={rc}); see {log.name}")
    recs = read_metrics(metrics)
    return {"dir": run_dir, "records": recs, "wall_s": time.time() - t0}


def hard_file(cfg) -> list[str]:
    """The hard split among data.eval_files (file stem containing 'hard'), else all of them."""
    hard = [f for f in cfg.data.eval_files if "hard" in os.path.basename(f)]
    return hard or list(cfg.data.eval_files)


def eval_pass_k(ckpt: str | None, k: int, config: str, overrides: list[str], files: list[str], out: str,
                seed: int) -> dict:
    """`rfpo-megatron eval --k k` of a run's final checkpoint (None = the warm start) as a subprocess."""
    args = [sys.executable, "-m", "rfpo_megatron.cli", "eval", config, *overrides, "--k", str(k), "--files",
            ",".join(files), "--out", out, "--seed", str(seed)] + (["--checkpoint", ckpt] if ckpt else [])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    print(f"[compare] pass@{k} eval of {ckpt or 'the warm start'}", flush=True)
    with open(out + ".log", "w") as log:
        rc = subprocess.call(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"[compare] eval failed (rc={rc}); see {log.name}")
    with open(out) as fh:
        return json.load(fh)


def _last(recs: list[dict], key: str) -> float:
    vals = [r[key] for r in recs if r.get(key) is not None]
    return float(vals[-1]) if vals else float("nan")


def _mean(recs: list[dict], key: str, fixed_only: bool = False) -> float:
    vals = [r[key] for r in recs if r.get(key) is not None and (not fixed_only or r.get("rfpo/fixed_seq_frac", 0) > 0)]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(run: dict, k: int) -> dict:
    """Final eval numbers and run-averaged rfpo/* statistics of one run."""
    recs = run["records"]
    s = {"steps": recs[-1]["step"], "generations": _last(recs, "rollout/generations_total"), "wall_s": run["wall_s"]}
    for split in ("eval_hard", "eval_easy"):
        s[f"{split}/avg@{k}"] = _last(recs, f"eval/{split}/avg@{k}")
        s[f"{split}/pass@{k}"] = _last(recs, f"eval/{split}/pass@{k}")
    s["train/kl_loss"] = _last(recs, "train/kl_loss")  # KL to the warm start (with the C3 probe: coef 0)
    for key in ("rfpo/zero_group_frac", "rfpo/fix_success_rate", "rollout/reward_mean", "rfpo/internalization_rate",
                "rfpo/fixed_seq_frac"):
        s[key] = _mean(recs, key) if key != "rfpo/internalization_rate" else _last(recs, key)
    for key in ("rfpo/roff_mean", "rfpo/roff_min", "rfpo/roff_max", "rfpo/roff_clamped_frac"):
        s[key] = _mean(recs, key, fixed_only=True)
    bins = sorted({key for r in recs for key in r if key.startswith("rfpo/log_roff_hist_")},
                  key=lambda x: int(x.rsplit("_", 1)[1]))
    if bins:  # counts of placed fixes per log R_off bin, summed over the run's steps
        s["rfpo/log_roff_hist"] = [sum(r.get(b) or 0.0 for r in recs) for b in bins]
    return s


def _hist(summaries: list[dict]) -> str:
    """Pooled log R_off histogram of several runs: each bin's share of all placed fixes, `a/b/...`."""
    counts = [h for h in (ss.get("rfpo/log_roff_hist") for ss in summaries) if h]
    if not counts:
        return "n/a"
    tot = [sum(c) for c in zip(*counts)]
    n = sum(tot)
    if not n:
        return "no fixes"
    return "/".join(f"{c / n:.2f}" for c in tot) + f" (n={n:.0f})"


def _ms(values: list[float]) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "n/a"
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


def table(summaries: dict, k: int, start: dict, pooled: str | None = None) -> str:
    rows = [("final hard-split solve rate (avg@%d, no fix prompt)" % k, f"eval_hard/avg@{k}"),
            (f"final hard-split pass@{k}", f"eval_hard/pass@{k}"),
            (f"final easy-split accuracy (avg@{k})", f"eval_easy/avg@{k}"),
            (f"final easy-split pass@{k}", f"eval_easy/pass@{k}"),
            ("rollout reward mean (run average)", "rollout/reward_mean"),
            ("zero_group_frac (run average)", "rfpo/zero_group_frac"),
            ("fix_success_rate (run average)", "rfpo/fix_success_rate"),
            ("placed-fix share of the trained samples (run average)", "rfpo/fixed_seq_frac"),
            ("R_off mean (steps with fixes)", "rfpo/roff_mean"),
            ("R_off min", "rfpo/roff_min"), ("R_off max", "rfpo/roff_max"),
            ("R_off clamped fraction", "rfpo/roff_clamped_frac"),
            ("internalization_rate (end)", "rfpo/internalization_rate"),
            ("KL to the warm start (k3, last step; `algo.use_kl_loss=true algo.kl_loss_coef=0`)", "train/kl_loss"),
            ("rollout budget (sampled responses, fixes included)", "generations"),
            ("steps", "steps"), ("wall time (s)", "wall_s")]
    keys = sorted({key for per in summaries.values() for ss in per.values() for key in ss
                   if key.startswith("boundary/")}, key=lambda x: int(x.split("@")[1]))
    rows += [(f"hard split {key.split('/')[1]} (final, {keys[-1].split('@')[1]} samples per prompt)", key)
             for key in keys]
    methods = [m for m in ("grpo", "grpo_ds", *(k for k in METHODS if k not in BASELINES)) if m in summaries]
    seeds = sorted(next(iter(summaries.values())))
    lines = [f"| metric (mean ± std over {'seeds ' + ', '.join(map(str, seeds)) if pooled is None else pooled}) | "
             + " | ".join(LABELS[m] for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    if start:
        lines.append(f"| warm start: hard avg@{k} / easy avg@{k} (step 0) | "
                     f"{start.get(f'eval/eval_hard/avg@{k}', float('nan')):.3f} / "
                     f"{start.get(f'eval/eval_easy/avg@{k}', float('nan')):.3f} |" + " same |" * (len(methods) - 1))
    for label, key in rows:
        if key.startswith("boundary/") and start.get(key) is not None:
            label += f" — warm start {start[key]:.3f}"
        lines.append(f"| {label} | " + " | ".join(_ms([summaries[m][s].get(key, float("nan")) for s in seeds]) for m in methods) + " |")
    lines.append("| log R_off histogram: share of the placed fixes in 8 equal bins over [−roff_clip, roff_clip] "
                 "(clamped ones in the end bins), pooled over steps and runs | "
                 + " | ".join(_hist([summaries[m][s] for s in seeds]) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def _series(per_seed: dict, key: str, xkey: str, fixed_only: bool = False) -> tuple[list, list, list, list]:
    """Mean (and min/max) over seeds of `key`, aligned by the i-th record that has it (GRPO seeds may end at
    different steps, so their final evals align by order); x = the mean of `xkey` at those records."""
    per = []
    for run in per_seed.values():
        per.append([(r.get(xkey, r["step"]), r[key]) for r in run["records"] if r.get(key) is not None
                    and (not fixed_only or r.get("rfpo/fixed_seq_frac", 0) > 0)])
    if fixed_only:  # sparse (steps with fixes): plot every point of every seed
        pts = sorted(p for seq in per for p in seq)
        return [x for x, _ in pts], [y for _, y in pts], [y for _, y in pts], [y for _, y in pts]
    n = min((len(seq) for seq in per), default=0)
    xs = [sum(seq[i][0] for seq in per) / len(per) for i in range(n)]
    ys = [[seq[i][1] for seq in per] for i in range(n)]
    return xs, [sum(v) / len(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def plot(runs: dict, k: int, path: str) -> None:
    """Mean over seeds (line) and the min-max range (band) of each metric, GRPO vs RFPO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colors = {"grpo": "tab:blue", "grpo_ds": "tab:green", "rfpo": "tab:red", "rfpo_g0": "tab:orange",
              "rfpo_faithful": "tab:purple", "rfpo_corrected": "tab:brown", "rfpo_guide": "tab:pink",
              "rfpo_luffy": "tab:olive", "rfpo_wzero": "tab:cyan", "rfpo_error_info": "tab:gray",
              "rfpo_reward": "gold", "rfpo_rewrite": "navy"}
    panels = [(f"eval/eval_hard/avg@{k}", "hard-split solve rate (avg@k, no fix prompt)", "rollout/generations_total"),
              (f"eval/eval_easy/avg@{k}", "easy-split accuracy (avg@k)", "rollout/generations_total"),
              ("rfpo/zero_group_frac", "zero_group_frac", "step"),
              ("rfpo/fix_success_rate", "fix_success_rate (RFPO)", "step"),
              ("rfpo/roff_mean", "R_off mean over fixed seqs (RFPO; steps with fixes)", "step"),
              ("rollout/reward_mean", "rollout reward mean", "step")]
    for ax, (key, title, xkey) in zip(axes.flat, panels):
        for method, per_seed in runs.items():
            if method in BASELINES and (key.startswith("rfpo/fix") or "roff" in key):
                continue
            fixed_only = "roff" in key
            xs, mean, lo, hi = _series(per_seed, key, xkey, fixed_only)
            if not xs:
                continue
            style = {"marker": "o", "ms": 4} if ("eval" in key or fixed_only) else {}
            label = f"{LABELS[method]} ({'all seeds' if fixed_only else f'mean of {len(per_seed)} seeds'})"
            ax.plot(xs, mean, color=colors[method], label=label,
                    linestyle="" if fixed_only else "-", **style)
            if not fixed_only:
                ax.fill_between(xs, lo, hi, color=colors[method], alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sampled responses (rollout budget, fixes included)" if xkey != "step" else "step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def boundary_plot(summaries: dict, start: dict, path: str) -> None:
    """pass@j on the hard split vs j (log scale): mean over runs per method (band: min-max) and the warm start."""
    keys = sorted({key for per in summaries.values() for ss in per.values() for key in ss
                   if key.startswith("boundary/")}, key=lambda x: int(x.split("@")[1]))
    if not keys:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    js = [int(key.split("@")[1]) for key in keys]
    fig, ax = plt.subplots(figsize=(6, 4))
    if all(key in start for key in keys):
        ax.plot(js, [start[key] for key in keys], "k--", marker="o", ms=3, label="warm start")
    for m, per in summaries.items():
        vals = [[ss[key] for ss in per.values() if ss.get(key) is not None] for key in keys]
        if not all(vals):
            continue
        line, = ax.plot(js, [sum(v) / len(v) for v in vals], marker="o", ms=3,
                        label=f"{LABELS.get(m, m)} ({len(vals[0])} runs)")
        ax.fill_between(js, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per hard prompt)")
    ax.set_ylabel("hard-split pass@k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def pool(dirs: list[str], out: str) -> int:
    """One table over several compare runs (one per warm start): every (warm start, seed) pair is a sample."""
    from rfpo_megatron.logging import read_metrics

    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    if len(set(names)) != len(names):
        raise SystemExit(f"--pool: the directories' names must differ (they label the runs): {names}")
    merged: dict = {}
    runs: dict = {}
    starts = []
    ks = set()
    for d, name in zip(dirs, names):
        path = os.path.join(d, "compare.json")
        if not os.path.isfile(path):
            raise SystemExit(f"--pool: {path} is missing (run compare.py --out {d} first)")
        with open(path) as fh:
            data = json.load(fh)
        if data.get("pooled"):
            raise SystemExit(f"--pool: {d} is itself a pooled output; pool the per-warm-start directories")
        starts.append(data.get("warm_start") or {})
        for m, per in data["summaries"].items():
            for s, summ in per.items():
                if summ.get("train/kl_loss") == 0.0:  # logged as exactly 0 when the KL probe was off: not a KL
                    summ["train/kl_loss"] = float("nan")
                merged.setdefault(m, {})[f"{name}/{s}"] = summ
                ks |= {int(key.split("@")[1]) for key in summ if key.startswith("eval_hard/avg@")}
                metrics = os.path.join(d, f"{m}_seed{s}", "logs", "metrics.jsonl")
                if os.path.isfile(metrics):  # the per-step records, for the plot
                    runs.setdefault(m, {})[f"{name}/{s}"] = {"records": read_metrics(metrics)}
    if len(ks) != 1:
        raise SystemExit(f"--pool: the runs must share one eval k (trainer.eval_n_samples), found {sorted(ks)}")
    k = ks.pop()
    start = {}
    for key in {key for st in starts for key in st}:
        vals = [st[key] for st in starts if isinstance(st.get(key), (int, float))]
        if vals:
            start[key] = sum(vals) / len(vals)
    if runs:
        plot(runs, k, os.path.join(out, "compare.png"))
    boundary_plot(merged, start, os.path.join(out, "boundary.png"))
    n = len(next(iter(merged.values())))
    md = table(merged, k, start, pooled=f"{len(dirs)} warm starts × seeds = {n} runs; warm-start rows: mean")
    with open(os.path.join(out, "compare.md"), "w") as fh:
        fh.write(f"Pooled over {', '.join(dirs)}\n\n" + md)
    with open(os.path.join(out, "compare.json"), "w") as fh:
        json.dump({"summaries": merged, "warm_start": start, "pooled": dirs}, fh, indent=1, default=str)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=100, help="RFPO steps (GRPO gets the same rollout budget)")
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--config", default=os.path.join("examples", "tiny_cpu", "config.yaml"))
    p.add_argument("--out", default=os.path.join("outputs", "compare"))
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (each run: trainer + engine process)")
    p.add_argument("--methods", nargs="+", default=["rfpo", "grpo"], choices=sorted(METHODS),
                   help="RFPO and its variants run --steps steps; the baselines (grpo, grpo_ds = GRPO + dynamic sampling) "
                        "run until RFPO's rollout budget of the same seed (rfpo is added when a baseline is asked)")
    p.add_argument("--warm-start", default=None,
                   help="a prepare.py --out directory: its model/ and data/ replace the config's paths")
    p.add_argument("--pass-k", type=int, default=0,
                   help="also evaluate the warm start and each final checkpoint on the hard split with this many "
                        "samples per prompt (pass@1 ... pass@K); 0 = off")
    p.add_argument("--pool", nargs="+", default=None,
                   help="pool these compare output directories (one per warm start) into one table in --out")
    p.add_argument("--reuse", action="store_true",
                   help="read runs that already finished in --out (final checkpoint present) instead of re-running "
                        "them (e.g. after a failed pass@k eval); their wall time reads n/a")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for both methods")
    a = p.parse_args(argv)
    global REUSE
    REUSE = a.reuse
    a.methods = list(dict.fromkeys(a.methods))  # a method named twice would run twice into one directory
    os.makedirs(a.out, exist_ok=True)
    sys.path.insert(0, REPO)
    if a.pool:
        return pool(a.pool, a.out)
    from rfpo_megatron.config import load_config

    if a.warm_start:
        w = os.path.abspath(a.warm_start)
        if not os.path.isfile(os.path.join(w, "model", "config.json")):
            raise SystemExit(f"--warm-start {a.warm_start}: no model/config.json (a prepare.py --out directory?)")
        d = os.path.join(w, "data")
        a.overrides = [f"actor.hf_model_path={w}/model", f"data.train_files=[{d}/train_rl.jsonl]",
                       f"data.eval_files=[{d}/eval_easy.jsonl,{d}/eval_hard.jsonl]", *a.overrides]

    cfg = load_config(a.config, a.overrides)
    k = cfg.trainer.eval_n_samples
    per_step = cfg.data.prompts_per_step * cfg.rollout.n_samples
    if any(m in BASELINES for m in a.methods) and "rfpo" not in a.methods:
        a.methods = ["rfpo", *a.methods]  # the baselines' budget comes from RFPO's run
    variants = [m for m in a.methods if m not in BASELINES]
    done = run_many([(m, s, a.steps, a.out, a.config, a.eval_interval, a.overrides) for m in variants
                     for s in a.seeds], a.parallel)
    runs: dict = {m: dict(zip(a.seeds, done[i * len(a.seeds):(i + 1) * len(a.seeds)])) for i, m in enumerate(variants)}
    baselines = [m for m in a.methods if m in BASELINES]
    jobs = []
    for m in baselines:  # each baseline gets RFPO's rollout budget (fix generations included)
        for seed in a.seeds:
            budget = int(_last(runs["rfpo"][seed]["records"], "rollout/generations_total"))
            cap = 10 * max(a.steps, math.ceil(budget / per_step))  # steps cap; the budget stops it first
            jobs.append((m, seed, cap, a.out, a.config, a.eval_interval,
                         [*a.overrides, f"trainer.max_generations={budget}"]))
    done = run_many(jobs, a.parallel)
    for i, m in enumerate(baselines):
        runs[m] = dict(zip(a.seeds, done[i * len(a.seeds):(i + 1) * len(a.seeds)]))
    summaries = {m: {s: summarize(r, k) for s, r in per.items()} for m, per in runs.items()}
    if not cfg.algo.use_kl_loss:  # train/kl_loss is logged as 0 without the reference pass: not a KL
        for per in summaries.values():
            for summ in per.values():
                summ["train/kl_loss"] = float("nan")
    start = {}
    try:  # the warm start itself, evaluated the same way (step 0)
        from rfpo_megatron.evaluate import evaluate_checkpoint

        start = evaluate_checkpoint(load_config(a.config, a.overrides), None, seed=a.seeds[0])
    except Exception as exc:  # noqa: BLE001 - the table still stands without it
        print(f"[compare] warm-start eval skipped: {exc}")
    if a.pass_k:  # the capability boundary: pass@1..K on the hard split, warm start and final checkpoints
        from concurrent.futures import ThreadPoolExecutor

        files = hard_file(cfg)
        jobs = [(None, "warm_start", None)] + [(r["dir"] + "/ckpt", m, s) for m, per in runs.items()
                                                for s, r in per.items()]
        with ThreadPoolExecutor(max_workers=max(1, a.parallel)) as ex:
            res = list(ex.map(lambda j: eval_pass_k(j[0], a.pass_k, a.config, a.overrides, files,
                                                    os.path.join(a.out, f"passk_{j[1]}_{j[2]}.json"),
                                                    seed=a.seeds[0]), jobs))
        start.update({f"boundary/{key.split('/')[-1]}": v for key, v in res[0].items() if "/pass@" in key})
        for (ck, m, s), r in zip(jobs[1:], res[1:]):
            summaries[m][s].update({f"boundary/{key.split('/')[-1]}": v for key, v in r.items() if "/pass@" in key})
    md = table(summaries, k, start)
    with open(os.path.join(a.out, "compare.md"), "w") as fh:
        fh.write(f"GRPO vs RFPO, tiny CPU addition task ({a.config}; {' '.join(a.overrides)})\n\n" + md)
    with open(os.path.join(a.out, "compare.json"), "w") as fh:
        json.dump({"summaries": summaries, "warm_start": start}, fh, indent=1, default=str)
    plot(runs, k, os.path.join(a.out, "compare.png"))
    boundary_plot(summaries, start, os.path.join(a.out, "boundary.png"))
    print(md)
    print(f"[compare] wrote {a.out}/compare.md, compare.png, compare.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
