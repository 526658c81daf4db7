"""examples/tiny_cpu/compare.py --pool: one table over several warm starts, every (warm start, seed) a sample;
the pass@k boundary rows. Values hand-worked (mean and sample std of 4 numbers)."""
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples", "tiny_cpu"))

import compare  # noqa: E402


def _summ(hard: float, p64: float) -> dict:
    return {"eval_hard/avg@4": hard, "eval_hard/pass@4": hard, "eval_easy/avg@4": 0.9, "eval_easy/pass@4": 1.0,
            "steps": 60, "generations": 4000, "wall_s": 1.0, "boundary/pass@1": hard, "boundary/pass@64": p64}


def test_pool_two_warm_starts(tmp_path):
    vals = {"w0": {"rfpo": [0.1, 0.3], "grpo": [0.0, 0.2]}, "w1": {"rfpo": [0.5, 0.7], "grpo": [0.2, 0.2]}}
    for w, per in vals.items():
        d = tmp_path / w
        d.mkdir()
        summaries = {m: {str(s): _summ(v, 2 * v) for s, v in zip((1, 2), xs)} for m, xs in per.items()}
        start = {"eval/eval_hard/avg@4": 0.1 if w == "w0" else 0.3, "eval/eval_easy/avg@4": 0.9,
                 "boundary/pass@64": 0.4 if w == "w0" else 0.6}
        (d / "compare.json").write_text(json.dumps({"summaries": summaries, "warm_start": start}))
    out = tmp_path / "pooled"
    out.mkdir()
    assert compare.pool([str(tmp_path / "w0"), str(tmp_path / "w1")], str(out)) == 0
    md = (out / "compare.md").read_text()
    data = json.loads((out / "compare.json").read_text())
    assert sorted(data["summaries"]["rfpo"]) == ["w0/1", "w0/2", "w1/1", "w1/2"]
    rf = [0.1, 0.3, 0.5, 0.7]
    m = sum(rf) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in rf) / 3)
    row = next(line for line in md.splitlines() if line.startswith("| final hard-split solve rate"))
    assert row.split("|")[1:4][1:] == [" 0.150 ± 0.100 ", f" {m:.3f} ± {sd:.3f} "]  # GRPO [0, .2, .2, .2], RFPO
    b64 = next(line for line in md.splitlines() if "pass@64" in line and "hard split" in line)
    assert "warm start 0.500" in b64 and f"{2 * m:.3f} ± {2 * sd:.3f}" in b64
    assert data["warm_start"]["eval/eval_hard/avg@4"] == 0.2


def test_methods_variants_run_steps_baselines_get_rfpo_budget(tmp_path, monkeypatch):
    """RFPO variants (C3) run --steps steps; GRPO baselines get RFPO's rollout budget of the same seed."""
    calls = []

    def fake_run_one(method, seed, steps, out, config, eval_interval, overrides):
        calls.append((method, seed, steps, [o for o in overrides if o.startswith("trainer.max_generations")]))
        recs = [{"step": 1, "rollout/generations_total": 100 * seed + (7 if method == "rfpo" else 0),
                 "eval/eval_hard/avg@4": 0.1, "eval/eval_easy/avg@4": 0.9}]
        return {"dir": str(tmp_path / f"{method}{seed}"), "records": recs, "wall_s": 1.0}

    monkeypatch.setattr(compare, "run_one", fake_run_one)
    monkeypatch.setattr(compare, "plot", lambda *a, **k: None)
    cfg = os.path.join(REPO, "examples", "tiny_cpu", "config.yaml")
    rc = compare.main(["--seeds", "1", "2", "--steps", "5", "--methods", "rfpo_luffy", "grpo", "--parallel", "1",
                       "--config", cfg, "--out", str(tmp_path / "out"), "actor.hf_model_path=/nonexistent"])
    assert rc == 0
    assert [(m, s, st) for m, s, st, _ in calls[:4]] == [("rfpo", 1, 5), ("rfpo", 2, 5), ("rfpo_luffy", 1, 5),
                                                         ("rfpo_luffy", 2, 5)]
    assert [(m, s, b) for m, s, _, b in calls[4:]] == [("grpo", 1, ["trainer.max_generations=107"]),
                                                       ("grpo", 2, ["trainer.max_generations=207"])]
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "RFPO LUFFY-style" in md and "| GRPO | RFPO | RFPO LUFFY-style" in md


def test_reproduce_compare_check_uses_the_documented_spread():
    """tools/reproduce.py c2/c3: a pooled mean passes when within max(documented std, 0.02) of the documented mean."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import reproduce

    doc = {"summaries": {"rfpo": {"a/1": {"eval_hard/avg@4": 0.1}, "a/2": {"eval_hard/avg@4": 0.3}}}}
    near = {"summaries": {"rfpo": {"a/1": {"eval_hard/avg@4": 0.25}, "a/2": {"eval_hard/avg@4": 0.35}}}}
    far = {"summaries": {"rfpo": {"a/1": {"eval_hard/avg@4": 0.5}, "a/2": {"eval_hard/avg@4": 0.6}}}}
    assert reproduce.compare_check(near, doc)  # |0.30 - 0.20| = 0.10 <= std 0.141
    assert not reproduce.compare_check(far, doc)  # 0.35 > 0.141
    assert not reproduce.compare_check({"summaries": {}}, doc)  # a method that did not run is outside


def test_roff_histogram_sums_steps_then_pools_runs():
    """summarize sums each log R_off bin over the run's steps (steps without the keys count 0); the table's row
    pools the runs' counts and prints each bin's share of all placed fixes (hand-worked)."""
    h = lambda *c: {f"rfpo/log_roff_hist_{i}": float(x) for i, x in enumerate(c)}  # noqa: E731
    run_a = {"records": [{"step": 1, **h(1, 0, 2)}, {"step": 2}, {"step": 3, **h(0, 1, 0)}], "wall_s": 1.0}
    run_b = {"records": [{"step": 1, **h(0, 0, 4)}], "wall_s": 1.0}
    sa, sb = compare.summarize(run_a, 4), compare.summarize(run_b, 4)
    assert sa["rfpo/log_roff_hist"] == [1, 1, 2] and sb["rfpo/log_roff_hist"] == [0, 0, 4]
    assert compare._hist([sa, sb]) == "0.12/0.12/0.75 (n=8)"  # [1, 1, 6] / 8
    assert compare._hist([{}, {}]) == "n/a" and compare._hist([{"rfpo/log_roff_hist": [0, 0]}]) == "no fixes"
    md = compare.table({"rfpo": {"1": sa, "2": sb}}, 4, {})
    assert "| log R_off histogram" in md and md.rstrip().endswith("| 0.12/0.12/0.75 (n=8) |")
