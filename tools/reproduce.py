"""Re-derive the CPU numbers of docs/benchmarks.md on this machine (`make reproduce`).

    python tools/reproduce.py --list                    # targets, what they re-derive, time on the 2-core box
    python tools/reproduce.py warmstart                 # the warm-start band (the 6 runs it was measured on)
    python tools/reproduce.py warmstart --full          # the whole band matrix (9 runs)
    python tools/reproduce.py warmstart --full --write-band   # (re)write examples/tiny_cpu/warmstart_band.json
    python tools/reproduce.py accuracy bench-step       # several targets in a row

Each target prints what it measured next to what is documented and ends with `ok` / `OUTSIDE`; the exit
status is 1 if any number fell outside its documented spread. Outputs go to outputs/reproduce/<target>/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "examples", "tiny_cpu")
sys.path.insert(0, TINY)
OUT = os.path.join(REPO, "outputs", "reproduce")

# The warm-start recipe the band is documented for (prepare.py flags) and the runs: MEASURED is what the band
# in examples/tiny_cpu/warmstart_band.json was computed from (seeds 0-4 at 1 thread with the AVX2 kernels, seed 0
# with the portable kernels, ATEN_CPU_CAPABILITY=default; seed 4 ends in its restart, init seed 1004); FULL adds
# the 2-thread runs and seed 1 with the portable kernels (issue 20's matrix; measured one by one 2026-12-02: the
# 2-thread runs equal the 1-thread ones, seed 1 portable is OUTSIDE on the reference fix, docs/benchmarks.md).
from prepare import recipe_defaults  # noqa: E402  (examples/tiny_cpu, on sys.path above)

RECIPE = recipe_defaults()  # prepare.py's own defaults: the recipe is stated once, there
MEASURED = [(0, 1, "avx2"), (1, 1, "avx2"), (2, 1, "avx2"), (0, 1, "default"), (3, 1, "avx2"), (4, 1, "avx2")]
FULL = MEASURED + [(0, 2, "avx2"), (1, 2, "avx2"), (1, 1, "default")]
ACC_MARGIN = 0.03  # ~1 standard error of an accuracy over 128 prompts


def log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: list[str], env: dict | None = None, logfile: str | None = None) -> int:
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", **(env or {}))
    if logfile is None:
        return subprocess.call(cmd, cwd=REPO, env=full_env)
    with open(logfile, "w") as f:
        return subprocess.call(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT)


# ------------------------------------------------------------------------------------------ warmstart

def warmstart_run(seed: int, threads: int, isa: str) -> dict:
    """prepare.py with the band's recipe into outputs/reproduce/warmstart/s{seed}_t{threads}_{isa}/."""
    out = os.path.join(OUT, "warmstart", f"s{seed}_t{threads}_{isa}")
    os.makedirs(out, exist_ok=True)
    flags = [x for k, v in RECIPE.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, os.path.join(TINY, "prepare.py"), "--out", out, "--seed", str(seed),
           "--threads", str(threads), *flags]
    t0 = time.time()
    rc = _run(cmd, env={"OMP_NUM_THREADS": str(threads), "ATEN_CPU_CAPABILITY": isa},
              logfile=os.path.join(out, "prepare.log"))
    if rc != 0:
        raise SystemExit(f"prepare.py failed (rc {rc}) for seed {seed}, {threads} threads, {isa}: "
                         f"see {os.path.join(out, 'prepare.log')}")
    with open(os.path.join(out, "warmstart_report.json")) as f:
        rep = json.load(f)
    rep["_run"] = {"seed": seed, "threads": threads, "isa": isa, "wall_s": round(time.time() - t0)}
    log(f"  seed {seed}, {threads} thread(s), {isa}: easy {rep['easy_acc_greedy']:.3f} hard {rep['hard_acc_greedy']:.3f} "
        f"ref fix {rep['fix_on_hard']['reference']['fix_success_rate']:.3f} SFT loss {rep['sft']['final_loss']:.4f} "
        f"(gate at step {rep['sft']['gated_at']}, {rep['sft']['steps']} steps, {rep['_run']['wall_s']} s)")
    return rep


def make_band(reports: list[dict]) -> dict:
    """mean/min/max of each band metric over the runs; band = [min - margin, max + margin] (accuracies,
    margin ACC_MARGIN, clipped to [0, 1]) and [0, 2 x max] for the final SFT loss."""
    from warmstart import BAND_METRICS, _get

    metrics = {}
    for path in BAND_METRICS:
        vals = [_get(r, path) for r in reports]
        lo, hi = min(vals), max(vals)
        band = [0.0, round(2 * hi, 4)] if path[-1] == "final_loss" else \
            [round(max(0.0, lo - ACC_MARGIN), 3), round(min(1.0, hi + ACC_MARGIN), 3)]
        metrics[".".join(path)] = {"mean": round(statistics.mean(vals), 4), "std": round(statistics.pstdev(vals), 4),
                                   "min": round(lo, 4), "max": round(hi, 4), "band": band}
    return metrics


def target_warmstart(a: argparse.Namespace) -> bool:
    from warmstart import check_band

    matrix = FULL if a.full else MEASURED
    log(f"warmstart: {len(matrix)} prepare.py runs (seed, threads, kernels) = {matrix}, {a.parallel} at a time")
    with ThreadPoolExecutor(a.parallel) as ex:
        reports = list(ex.map(lambda m: warmstart_run(*m), matrix))
    band_path = os.path.join(TINY, "warmstart_band.json")
    if a.write_band:
        band = {"recipe": RECIPE, "measured": f"{time.strftime('%Y-%m-%d')}, {len(reports)} runs: "
                f"(seed, threads, ATEN_CPU_CAPABILITY) in {matrix}", "metrics": make_band(reports),
                "runs": [dict(r["_run"], **{k: r[k] for k in ("easy_acc_greedy", "hard_acc_greedy", "easy_acc_t1",
                                                              "hard_acc_t1")},
                              ref_fix=r["fix_on_hard"]["reference"]["fix_success_rate"], sft=r["sft"]) for r in reports]}
        with open(band_path, "w") as f:
            json.dump(band, f, indent=1)
        log(f"band written -> {band_path}")
    with open(band_path) as f:
        band = json.load(f)
    ok = True
    for r in reports:
        lines, outside = check_band(r, band)
        run = r["_run"]
        log(f"seed {run['seed']}, {run['threads']} thread(s), {run['isa']}: {'ok' if not outside else 'OUTSIDE: ' + ', '.join(outside)}")
        if outside:
            print("\n".join("    " + x for x in lines))
        ok &= not outside
    return ok


# ------------------------------------------------------------------------------------- other targets

ACCURACY_TESTS = [  # the accuracy rows of docs/benchmarks.md's CPU table, each asserted by these tests
    "tests/test_kernels_reference.py", "tests/test_kernels_logprob.py", "tests/test_kernels_loss.py",
    "tests/test_kernels_tp.py", "tests/test_actor_parallel.py", "tests/test_convert_dist.py",
    "tests/test_convert_tools.py", "tests/test_rollout_embedded.py",
]


def target_accuracy(a: argparse.Namespace) -> bool:
    files = [f for f in ACCURACY_TESTS if os.path.exists(os.path.join(REPO, f))]
    log(f"accuracy: pytest {' '.join(files)} (each test asserts its row's documented bound)")
    return _run([sys.executable, "-m", "pytest", "-q", *files]) == 0


def target_bench_step(a: argparse.Namespace) -> bool:
    log("bench-step: tools/bench_step.py (timings depend on the machine and its load: printed, not checked)")
    return _run([sys.executable, os.path.join(REPO, "tools", "bench_step.py"), "--warmup", "2", "--steps", "5",
                 "--skip-old-logprob-pass", "both", "actor.micro_batch_size=64"], env={"OMP_NUM_THREADS": "2"}) == 0


# ------------------------------------------------------------------------------- c2 / c3 (compare.py)
# The documented comparisons (docs/benchmarks.md "C2" / "C3"): the three in-band warm starts (seeds 0-2, 1 thread,
# AVX2 -- the warmstart target's runs, re-made here if missing), compare.py per warm start, then --pool.
# examples/tiny_cpu/results/<name>.json is the pooled compare.json the docs' table was written from.
COMPARES = {
    "c2": dict(seeds=[1, 2, 3], steps=60, methods=["rfpo", "grpo", "grpo_ds"], extra=["--pass-k", "64"],
               overrides=[], parallel=2),
    "c3": dict(seeds=[1], steps=40, methods=["rfpo", "rfpo_g0", "rfpo_faithful", "rfpo_corrected", "rfpo_guide",
                                             "rfpo_luffy", "rfpo_wzero"], extra=[],
               overrides=["algo.use_kl_loss=true", "algo.kl_loss_coef=0.0"], parallel=1),
}
COMPARE_WARM = [0, 1, 2]
COMPARE_CHECK = ("eval_hard/avg@4", "eval_easy/avg@4", "eval_hard/pass@4", "rfpo/fix_success_rate",
                 "boundary/pass@64")


def _mean_std(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if isinstance(v, (int, float)) and v == v]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def compare_check(new: dict, doc: dict, floor: float = 0.02) -> bool:
    """Per (method, metric): the new pooled mean within max(documented std, floor) of the documented mean."""
    ok = True
    for m, per in doc["summaries"].items():
        for key in COMPARE_CHECK:
            dm, ds = _mean_std([x.get(key) for x in per.values()])
            if dm != dm:
                continue
            nm, _ = _mean_std([x.get(key) for x in new["summaries"].get(m, {}).values()])
            tol = max(ds, floor)
            good = nm == nm and abs(nm - dm) <= tol
            ok &= good
            log(f"  {m:15s} {key:22s} {nm:7.3f}  documented {dm:.3f} ± {ds:.3f}  {'ok' if good else 'OUTSIDE'}")
    return ok


def target_compare(name: str, a: argparse.Namespace) -> bool:
    spec = COMPARES[name]
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    ref = os.path.join(TINY, "results", f"{name}.json")
    if not os.path.isfile(ref):
        log(f"{name}: WARNING no documented result {ref}: the runs make the table but nothing is checked")
    warm = []
    for seed in COMPARE_WARM:
        w = os.path.join(OUT, "warmstart", f"s{seed}_t1_avx2")
        if not os.path.isfile(os.path.join(w, "warmstart_report.json")):
            log(f"{name}: warm start seed {seed} missing: making it (≈ 10-20 min)")
            warmstart_run(seed, 1, "avx2")
        warm.append(w)
    dirs = []
    for w in warm:
        d = os.path.join(out, os.path.basename(w).split("_")[0])
        dirs.append(d)
        cmd = [sys.executable, os.path.join(TINY, "compare.py"), "--seeds", *map(str, spec["seeds"]), "--steps",
               str(spec["steps"]), "--parallel", str(spec["parallel"]), "--methods", *spec["methods"], *spec["extra"],
               "--warm-start", w, "--out", d, *spec["overrides"]]
        log(f"{name}: {' '.join(cmd[1:])}")
        if _run(cmd, logfile=d + ".log") != 0:
            log(f"{name}: compare.py failed: see {d}.log")
            return False
    pooled = os.path.join(out, "pooled")
    if _run([sys.executable, os.path.join(TINY, "compare.py"), "--pool", *dirs, "--out", pooled]) != 0:
        return False
    with open(os.path.join(pooled, "compare.json")) as f:
        new = json.load(f)
    if not os.path.isfile(ref):
        log(f"{name}: no documented result {ref} to check against (table in {pooled}/compare.md)")
        return False
    with open(ref) as f:
        return compare_check(new, json.load(f))


@dataclass(frozen=True)
class Target:
    what: str
    minutes: str  # on the 2-core box, nothing else running
    fn: Callable[[argparse.Namespace], bool]


TARGETS = {
    "warmstart": Target("warm-start band (docs/benchmarks.md 'warm start'): easy/hard accuracy, reference fix "
                        "success, final SFT loss per run vs examples/tiny_cpu/warmstart_band.json",
                        "6 runs ≈ 50 min (2 at a time, quiet box; seed 4 alone ≈ 35 min: a failed attempt, then its restart); --full 9 runs ≈ 90 min", target_warmstart),
    "accuracy": Target("the accuracy rows of the CPU table (kernels vs float64, TP/PP vs TP 1, HF vs Megatron, "
                       "engine log-probs vs float64)", "≈ 4 min", target_accuracy),
    "bench-step": Target("the trainer step's stage breakdown (issue 18 shape)", "≈ 2 min", target_bench_step),
    "c2": Target("GRPO vs RFPO vs GRPO + dynamic sampling, 3 warm starts × 3 RL seeds, pass@1..64 (docs 'C2')",
                 "≈ 50 min (+ the 3 warm starts if missing)", lambda a: target_compare("c2", a)),
    "c3": Target("the R_off weightings and peer shapings, 3 warm starts × 1 RL seed (docs 'C3')",
                 "≈ 45 min (+ the 3 warm starts if missing)", lambda a: target_compare("c3", a)),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", help=f"any of {', '.join(TARGETS)} (default: warmstart accuracy)")
    p.add_argument("--list", action="store_true", help="list the targets with time estimates")
    p.add_argument("--full", action="store_true", help="warmstart: the whole band matrix")
    p.add_argument("--write-band", action="store_true", help="warmstart: (re)write warmstart_band.json from the runs")
    p.add_argument("--parallel", type=int, default=2, help="warmstart: prepare.py runs at a time (1 thread each "
                                                         "run uses 1 core; 2-thread runs count double)")
    a = p.parse_args(argv)
    if a.list:
        for name, t in TARGETS.items():
            print(f"{name:11s} {t.minutes:40s} {t.what}")
        return 0
    names = a.targets or ["warmstart", "accuracy"]
    bad = [n for n in names if n not in TARGETS]
    if bad:
        p.error(f"unknown target(s) {bad}; choose from {', '.join(TARGETS)} (--list)")
    results = {}
    for n in names:
        t0 = time.time()
        results[n] = TARGETS[n].fn(a)
        log(f"{n}: {'ok' if results[n] else 'OUTSIDE / FAILED'} ({(time.time() - t0) / 60:.1f} min)")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
