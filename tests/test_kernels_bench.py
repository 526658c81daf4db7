"""The GPU benchmark's CPU-checkable parts: clear failure without CUDA, floor/speedup arithmetic, markdown output."""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest
import torch

from rfpo_megatron.kernels import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_fails_clearly_without_gpu(capsys, tmp_path):
    out = tmp_path / "b.md"
    assert bench.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "tests/test_kernels_" in err
    assert not out.exists()
    assert bench.main(["--impls", "fused,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_floor_and_table_arithmetic():
    # copy bandwidth 1000 GB/s; N=32768, V=152064: floor = 3*N*V*2 B / 1e12 B/s
    n, v = 32768, 152064
    floor = 3 * n * v * 2 / 1e12 * 1e3
    assert bench.floor_ms(n, v, 1000.0, True) == pytest.approx(floor)
    assert bench.floor_ms(n, v, 1000.0, False) == pytest.approx(floor / 3)
    rep = bench.BenchReport("Fake GPU", 1000.0, versions={"torch": "x"})
    rep.results = [
        bench.Result("fused", n, v, 1.0, floor / 0.75, peak_extra_bytes=2 * n * v + 8 * n, max_abs_err=1e-6),
        bench.Result("fused", 8192, 131072, 0.5, 1.0, peak_extra_bytes=3 * 8192 * 131072),
        bench.Result("megatron", 8192, 131072, 2.0, 3.5),
        bench.Result("liger", 8192, 131072, note="skipped: ImportError"),
    ]
    table = bench.format_table(rep)
    rows = table.splitlines()
    assert len(rows) == 2 + 4 and all(r.count("|") == rows[0].count("|") for r in rows)
    cells = [c.strip() for c in rows[2].split("|")[1:-1]]
    assert cells[0] == "fused" and cells[6] == "75.0"  # % of floor
    assert cells[5] == f"{3 * n * v * 2 / (floor / 0.75 * 1e-3) / 1e9:.0f}"  # achieved GB/s
    assert cells[8] == f"{(2 * n * v + 8 * n) / (2 * n * v):.2f}"
    fused_small = [c.strip() for c in rows[3].split("|")[1:-1]]
    assert fused_small[9] == "3.50"  # 3.5 ms megatron / 1.0 ms fused
    goals = "\n".join(bench.goal_lines(rep))
    assert "75.0 % of the bandwidth floor (goal ≥ 75 %: met)" in goals
    assert "3.50× megatron-core" in goals and "met" in goals
    assert f"N={n} V={v}: peak extra" in goals and "O(N): yes" in goals
    assert "N=8192 V=131072: peak extra" in goals and "O(N): NO" in goals
    md = bench.render_markdown(rep, dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.timezone.utc))
    assert md.startswith("## Fused log-prob kernel — 2026-01-02 03:04 UTC — Fake GPU")
    assert "1000 GB/s" in md and table in md


def test_append_markdown_creates_then_appends(tmp_path):
    path = tmp_path / "docs" / "benchmarks.md"
    bench.append_markdown(str(path), "## one\n")
    bench.append_markdown(str(path), "## two\n")
    text = path.read_text()
    assert text.startswith("# Benchmarks") and text.index("## one") < text.index("## two")


def test_cpu_smoke_runs_all_comparisons(tmp_path):
    """The whole bench pipeline on tiny CPU shapes (torch twin, naive, megatron-core over gloo) in a subprocess:
    every implementation's log-probs agree with fp32 torch, and a dated table is appended."""
    out = tmp_path / "bench.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", RFPO_KERNEL_BACKEND="torch", MASTER_PORT=str(_free_port()))
    proc = subprocess.run(
        [sys.executable, "-m", "rfpo_megatron.cli", "bench", "--cpu-smoke", "--n", "16", "--v", "300",
         "--impls", "fused,fused+entropy,fused(inplace),naive,megatron", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in out.read_text().splitlines() if r.startswith("| ") and not r.startswith("| impl")]
    assert [r.split("|")[1].strip() for r in rows] == ["fused", "fused+entropy", "fused(inplace)", "naive", "megatron"]
    for r in rows:
        err = float(r.split("|")[11])
        assert err <= 1e-5, r


def test_tools_wrapper_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU path")
    proc = subprocess.run([sys.executable, "tools/bench_kernels.py", "--no-append"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
