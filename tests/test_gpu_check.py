"""The prepared GPU check (tools/gpu_check.sh): its --dry-run end to end on CPU, the goal arithmetic, time boxes.

The dry run is the device call rehearsed: every step runs in its own process (Triton interpreter, gloo), and
the JSON is checked here against bounds fixed in this file and against counts derived independently (the
tiny model's parameter count, FLOPs by hand), not against numbers the script computed for itself.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
STEPS = ["d_environment", "a_kernel_correctness", "b_kernel_speed", "c_actor_0.5b", "c_actor_1.5b"]


def _tool(name: str):
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "tools/gpu_check.sh", str(out), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    rep = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    return proc, rep, out


def test_dry_run_every_step_ok(dry_run):
    proc, rep, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert rep["mode"] == "dry-run" and list(rep["steps"]) == STEPS
    for key, s in rep["steps"].items():
        assert s["status"] == "ok", (key, s.get("error"))
        assert 0 < s["seconds"] <= s["time_box_s"]
    assert 0 < rep["wall_s"] < rep["budget_s"]
    assert "gpu_check dry-run" in proc.stdout and "b_kernel_speed" in proc.stdout
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {k} (rc 0" in log for k in STEPS)
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]  # ≤ 8 files come back


def test_dry_run_environment(dry_run):
    env = dry_run[1]["steps"]["d_environment"]["result"]
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["megatron-core"] == metadata.version("megatron-core")
    assert env["copy_gbps"] > 0 and env["matmul_tflops"] > 0 and len(env["date_utc"]) == 16
    assert "dry run" in env["install"] and "dry run" in env["device"]


def test_dry_run_kernel_correctness_vs_float64(dry_run):
    res = dry_run[1]["steps"]["a_kernel_correctness"]["result"]
    lp = [c for c in res["checks"] if c["kind"] == "logprobs"]
    loss = [c for c in res["checks"] if c["kind"] == "token_loss"]
    assert {(c["dtype"], c["inplace"]) for c in lp} == {("fp32", False), ("bf16", False), ("bf16", True)}
    assert {c["form"] for c in loss} == {"faithful", "corrected"}
    for c in lp:
        assert c["v_padded"] > c["vocab"] and c["temperature"] != 1.0
        assert c["logp_max_abs_err"] <= 1e-4 and c["entropy_max_abs_err"] <= 1e-4, c
        assert c["grad_padded_cols_max_abs"] == 0.0
        if c["dtype"] == "fp32":
            assert c["grad_max_abs_err"] <= 1e-5 * c["grad_ref_max_abs"], c
        else:  # bf16 gradient: within one bf16 rounding of the largest element, whatever the check's own bound says
            assert c["grad_max_abs_err"] <= 2.0**-8 * 1.01 * c["grad_ref_max_abs"], c
        assert c["grad_max_err_over_bound"] <= 1 and c["ok"]
    for c in loss:
        assert c["loss_max_abs_err"] <= 1e-5 and c["grad_max_abs_err"] <= 1e-5 and c["segsum_max_abs_err"] <= 1e-4, c
        assert c["ok"]
    assert res["ok"]


def test_dry_run_kernel_speed_rows(dry_run):
    rows = dry_run[1]["steps"]["b_kernel_speed"]["result"]["rows"]
    gpu_check = _tool("gpu_check")
    assert {(r["impl"], r["n"], r["v"]) for r in rows} == {
        (i, n, v) for i in gpu_check.IMPLS for n, v in gpu_check.DRY_SHAPES}
    for r in rows:
        assert r["note"] == "" and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0, r
        assert r["max_abs_err"] <= 1e-5, r  # every implementation's log-probs vs fp32 torch


def _params_by_hand(hf: dict, vocab_padded: int) -> int:
    h, f, heads, kv = hf["hidden_size"], hf["intermediate_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = h // heads
    layer = h * (heads + 2 * kv) * hd + (heads + 2 * kv) * hd + heads * hd * h + 3 * h * f + 2 * h
    return vocab_padded * h * (1 if hf["tie_word_embeddings"] else 2) + hf["num_hidden_layers"] * layer + h


def test_dry_run_actor_steps(dry_run):
    for key in ("c_actor_0.5b", "c_actor_1.5b"):
        r = dry_run[1]["steps"][key]["result"]
        assert r["model"] == "tiny" and r["layout"] == "pad" and not r["bf16"]
        assert r["params"] == _params_by_hand(r["hf_config"], 256)
        assert len(r["steps"]) == 4 and r["finite"]
        assert all(s["grad_norm"] > 0 and s["skipped"] == 0 for s in r["steps"])
        assert r["tokens"] > r["response_tokens"] > 0 and 0 < r["pad_efficiency"] <= 1
        assert r["train_tokens_per_s"] == pytest.approx(r["tokens"] / r["train_step_s"])
        assert 0 < r["train_mfu"] and 0 < r["logprobs_mfu"]
        assert r["logprob_vs_fp64_max_abs_err"] <= 1e-5  # kernel log-probs vs float64 log_softmax of the logits


def test_dry_run_markdown_drops_into_benchmarks_doc(dry_run, tmp_path):
    rep, out = dry_run[1], dry_run[2]
    report = _tool("gpu_check_report")
    md = (out / "gpu_check.md").read_text()
    assert md.startswith(report.BEGIN) and md.rstrip().endswith(report.END) and "DRY RUN" in md
    assert all(f"| {k} | ok |" in md for k in STEPS)
    doc = tmp_path / "benchmarks.md"
    shutil.copy(os.path.join(ROOT, "docs", "benchmarks.md"), doc)
    before = doc.read_text()
    assert before.count(report.BEGIN) == 1 and before.count(report.END) == 1
    subprocess.run([sys.executable, "tools/gpu_check.py", "--render", str(out / "gpu_check.json"), "--into", str(doc)],
                   cwd=ROOT, check=True, timeout=120)
    after = doc.read_text()
    head, tail = before.split(report.BEGIN)[0], before.split(report.END)[1]
    assert after == head + report.render(rep).rstrip("\n") + tail


def test_goal_arithmetic_on_fake_gpu_numbers():
    report = _tool("gpu_check_report")
    n1, v1, n2, v2 = 8192, 131072, 32768, 152064
    gbps = 4000.0
    floor2 = 3 * n2 * v2 * 2 / (gbps * 1e9) * 1e3  # ms
    rows = [dict(impl="fused", n=n1, v=v1, fwd_ms=1.0, fwdbwd_ms=2.0, peak_extra_bytes=2 * n1 * v1 + 8 * n1,
                 max_abs_err=1e-6, note=""),
            dict(impl="megatron", n=n1, v=v1, fwd_ms=3.0, fwdbwd_ms=7.0, peak_extra_bytes=None, max_abs_err=1e-6, note=""),
            dict(impl="fused", n=n2, v=v2, fwd_ms=1.0, fwdbwd_ms=floor2 / 0.7, peak_extra_bytes=3 * n2 * v2,
                 max_abs_err=1e-6, note="")]
    check = dict(kind="logprobs", ok=True, logp_max_abs_err=3e-6, entropy_max_abs_err=1e-6, grad_max_err_over_bound=0.5)
    rep = {"mode": "gpu", "budget_s": 450, "wall_s": 1.0, "steps": {
        "d_environment": {"status": "ok", "seconds": 1.0, "result": {"device": "Fake", "copy_gbps": gbps}},
        "a_kernel_correctness": {"status": "ok", "seconds": 1.0, "result": {"checks": [check]}},
        "b_kernel_speed": {"status": "ok", "seconds": 1.0, "result": {"rows": rows}},
        "c_actor_0.5b": {"status": "timeout", "seconds": 9.0, "result": {}, "error": "killed at its time box"}}}
    g = report.goals(rep)
    assert g[0]["met"] is False and "70.0%" in g[0]["measured"] and "N = 32768, V = 152064" in g[0]["goal"]
    assert g[1]["met"] is True and "3.50×" in g[1]["measured"] and "N = 8192, V = 131072" in g[1]["goal"]
    assert g[2]["met"] is False and "1.000×" in g[2]["measured"] and "1.500×" in g[2]["measured"]
    assert g[3]["met"] is True and "3.00e-06" in g[3]["measured"]
    md = report.render(rep)
    assert "| c_actor_0.5b | timeout |" in md and "killed at its time box" in md and "**not met**" in md


def test_step_killed_at_its_time_box_is_recorded(tmp_path, monkeypatch):
    gpu_check = _tool("gpu_check")
    monkeypatch.setattr(gpu_check, "STEPS", {"d_environment": (1, 1), "a_kernel_correctness": (1, 1)})
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0)
    assert gpu_check.main([str(tmp_path), "--dry-run", "--budget-s", "7"]) == 1
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    d, a = rep["steps"]["d_environment"], rep["steps"]["a_kernel_correctness"]
    assert d["status"] == "timeout" and "time box of 1 s" in d["error"] and d["seconds"] < 6
    assert a["status"] in ("timeout", "skipped")
    assert (tmp_path / "gpu_check.md").read_text().count("timeout") >= 1


def test_wheel_list_and_no_gpu_message(tmp_path):
    wheels = subprocess.run(["bash", "tools/gpu_check.sh", "--list-wheels"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    assert wheels and all("==" in w for w in wheels)
    mc = [w for w in wheels if w.startswith("megatron-core==")]
    assert len(mc) == 1  # the carried megatron-core has the major.minor the CPU suite runs
    assert mc[0].split("==")[1].split(".")[:2] == metadata.version("megatron-core").split(".")[:2]
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU message")
    proc = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, GPU_CHECK_WHEELS=str(tmp_path / "none"),
                                                GPU_CHECK_SITE=str(tmp_path / "site"),
                                                PYTHON=os.path.join(ROOT, ".venv", "bin", "python")))
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert "install: failed: missing" in proc.stdout


def test_model_flops_by_hand():
    actor = _tool("gpu_check_actor")
    hf = dict(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    # per token and layer: qkv 2·8·(2+2)·4 = 256, o 2·8·8 = 128, mlp 2·3·8·12 = 576; head 2·8·16 = 256
    per_token = 2 * (256 + 128 + 576) + 256
    attn = 2 * 4 * 2 * 4 * (3 * 4 // 2 + 2 * 3 // 2)  # layers·(QKᵀ + PV = 4·heads·hd) per causal pair; L = 3, 2
    assert actor.model_flops(hf, [3, 2], 16) == per_token * 5 + attn


def test_correctness_checks_catch_wrong_kernels(monkeypatch):
    """Negative controls on the check itself (torch twins stand in for the Triton kernels): a correct twin
    passes, a wrong temperature, a read of the padded columns or the other loss form fails."""
    from rfpo_megatron.kernels import gpu_check, logprob, loss

    twin, loss_twin = logprob.vocab_parallel_logprobs_torch, loss.fused_rfpo_token_loss_torch
    variants = {
        "right": lambda x, y, **kw: twin(x, y, **kw),
        "temperature": lambda x, y, temperature, **kw: twin(x, y, temperature=temperature * 1.01, **kw),
        "padded columns": lambda x, y, vocab_size, **kw: twin(x, y, vocab_size=None, **kw),
    }
    for name, fn in variants.items():
        monkeypatch.setattr(logprob, "vocab_parallel_logprobs_triton", fn)
        for dtype in ("fp32", "bf16"):
            assert gpu_check.check_logprobs(24, 300, 384, dtype, "cpu", seed=5)["ok"] is (name == "right"), (name, dtype)
    monkeypatch.setattr(loss, "segment_sum_triton", loss.segment_sum_torch)
    swap = {"faithful": "corrected", "corrected": "faithful"}
    for wrong in (False, True):
        monkeypatch.setattr(loss, "fused_rfpo_token_loss_triton",
                            lambda *a: loss_twin(*a[:-1], swap[a[-1]] if wrong else a[-1]))
        for form in ("faithful", "corrected"):
            assert gpu_check.check_token_loss(400, 9, "cpu", form, seed=1)["ok"] is (not wrong), (form, wrong)
