#!/usr/bin/env python
"""Driver of the one-call GPU check (`tools/gpu_check.sh OUTDIR [--dry-run]`): every step in its own time-boxed process.

    python tools/gpu_check.py OUTDIR [--dry-run] [--budget-s 450] [--only d_environment,a_kernel_correctness]
    python tools/gpu_check.py --render OUTDIR/gpu_check.json [--into docs/benchmarks.md]

Steps, in order (each a subprocess of this script with `--run-step`, killed with its process group at its
time box; the whole run stays within `--budget-s`):
  d_environment         device, driver, CUDA, torch/triton/megatron-core/Python versions, date; the measured
                        copy bandwidth and bf16 matmul rate that (b) and (c) are compared with
  a_kernel_correctness  Triton log-prob and loss kernels vs float64 (rfpo_megatron/kernels/gpu_check.py)
  b_kernel_speed        fwd+bwd time and memory at (8192, 131072) and (32768, 152064) vs megatron-core and naive
  c_actor_0.5b, c_actor_1.5b   bf16 train_step / compute_logprobs of a random Qwen2.5-shaped actor
                        (tools/gpu_check_actor.py); 1.5B only if its time box still fits
After every step OUTDIR/gpu_check.json and OUTDIR/gpu_check.md are rewritten (a step that fails, times out
or is skipped is recorded with its status, error tail and partial results); step logs go to
OUTDIR/gpu_check.log. `--dry-run`: the same on CPU (tiny shapes, Triton interpreter, gloo), numbers
meaningless. Exit status 0 when every step ran ok, 1 otherwise, 2 for a usage error (no CUDA without --dry-run).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (HERE, ROOT) if p not in sys.path]

import gpu_check_report as report  # noqa: E402

# key -> (time box on the GPU, time box in the dry run), seconds
STEPS = {
    "d_environment": (60, 60),
    "a_kernel_correctness": (90, 90),
    "b_kernel_speed": (180, 120),
    "c_actor_0.5b": (150, 120),
    "c_actor_1.5b": (120, 120),
}
GPU_SHAPES = [(8192, 131072), (32768, 152064)]
DRY_SHAPES = [(8, 256), (12, 300)]
# measured implementation-major in this order: the goals' rows first, megatron's torch.compile'd CE last
IMPLS = ["fused", "megatron", "fused+entropy", "fused(inplace)", "naive", "megatron_fused"]
MIN_STEP_S = 20  # a step whose box would shrink below this is skipped
LOG_CAP = 200_000  # characters of each step's output kept in gpu_check.log


# ------------------------------------------------------------------------------------------------ step bodies
def _versions() -> dict:
    out = {"python": platform.python_version()}
    from importlib import metadata

    for name in ("torch", "triton", "megatron-core", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def step_environment(args, record) -> dict:
    """Device and versions; the copy bandwidth (GB/s, read + write) and bf16 (GPU) / fp32 (CPU) matmul TFLOP/s."""
    import torch

    info = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "host_cpus": os.cpu_count(),
            "versions": dict(_versions(), torch=torch.__version__), "install": os.environ.get("GPU_CHECK_INSTALL", "not run"),
            "kernel_backend": os.environ.get("RFPO_KERNEL_BACKEND", "auto")}
    if args.dry_run:
        info.update(device="cpu (dry run; numbers are meaningless)", cuda=None, driver=None)
        a = torch.empty(1 << 26, dtype=torch.uint8)
        b = torch.empty_like(a)
        t0 = time.perf_counter()
        for _ in range(5):
            b.copy_(a)
        info["copy_gbps"] = 5 * 2 * a.numel() / (time.perf_counter() - t0) / 1e9
        x = torch.randn(256, 256)
        t0 = time.perf_counter()
        for _ in range(10):
            x @ x
        info["matmul_tflops"] = 10 * 2 * 256**3 / (time.perf_counter() - t0) / 1e12
        info["matmul_dtype"] = "fp32"
        return info
    from rfpo_megatron.kernels import bench

    props = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda, sm=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["driver"] = q.stdout.strip() or q.stderr.strip()[:200]
    except Exception as e:  # noqa: BLE001
        info["driver"] = f"nvidia-smi failed: {e}"
    record(info)
    info["copy_gbps"] = bench.copy_bandwidth_gbps(nbytes=1 << 32)
    record(info)
    info["matmul_tflops"] = bench.matmul_tflops(8192)
    info["matmul_dtype"] = "bf16"
    return info


def step_kernel_correctness(args, record) -> dict:
    from rfpo_megatron.kernels.gpu_check import BOUNDS, kernel_correctness

    return dict(kernel_correctness("cpu" if args.dry_run else "cuda", args.dry_run), bounds=BOUNDS)


def step_kernel_speed(args, record) -> dict:
    from rfpo_megatron.kernels.gpu_check import kernel_speed

    shapes = DRY_SHAPES if args.dry_run else GPU_SHAPES
    return kernel_speed("cpu" if args.dry_run else "cuda", shapes, IMPLS, warmup=25, rep=100, record=record)


def step_actor(model: str):
    def run(args, record) -> dict:
        from gpu_check_actor import actor_step

        return actor_step("tiny" if args.dry_run else model, args.dry_run, args.matmul_tflops, record)

    return run


BODIES = {"d_environment": step_environment, "a_kernel_correctness": step_kernel_correctness,
          "b_kernel_speed": step_kernel_speed, "c_actor_0.5b": step_actor("0.5b"), "c_actor_1.5b": step_actor("1.5b")}


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def run_child(args) -> int:
    """`--run-step KEY --json PATH`: run one step body; its (partial) result is rewritten to PATH as it goes."""
    last: dict = {}

    def record(partial: dict) -> None:
        last.clear()
        last.update(partial)
        _write_json(args.json, {"status": "partial", "result": partial})

    try:
        result = BODIES[args.run_step](args, record)
        _write_json(args.json, {"status": "ok", "result": result})
        return 0
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        _write_json(args.json, {"status": "failed", "result": dict(last), "error": traceback.format_exc()[-4000:]})
        return 1


# ----------------------------------------------------------------------------------------------- the parent
def _step_env(key: str, dry_run: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [p for p in (os.environ.get("PYTHONPATH", ""), ROOT) if p]))
    with socket.socket() as s:  # a free port for the step's single-rank process group
        s.bind(("127.0.0.1", 0))
        env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(s.getsockname()[1])
    if dry_run:  # the Triton path on CPU tensors too (in the interpreter); on CUDA "auto" already picks Triton
        env.update(RFPO_KERNEL_BACKEND="triton", TRITON_INTERPRET="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
                   TORCHDYNAMO_DISABLE="1", CUDA_VISIBLE_DEVICES="")  # megatron's torch.compile'd CE runs eagerly
    return env


def run_step(key: str, box: float, args, work: str, log) -> dict:
    """One step in its own process group; returns {status, seconds, result, error?}."""
    path = os.path.join(work, key + ".json")
    cmd = [sys.executable, os.path.abspath(__file__), "--run-step", key, "--json", path]
    if args.dry_run:
        cmd.append("--dry-run")
    if args.matmul_tflops:
        cmd += ["--matmul-tflops", str(args.matmul_tflops)]
    out_path = os.path.join(work, key + ".log")
    t0 = time.monotonic()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_step_env(key, args.dry_run),
                                cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=box)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    seconds = time.monotonic() - t0
    text = open(out_path, errors="replace").read()
    log.write(f"\n===== {key} (rc {rc}, {seconds:.1f} s of {box:.0f} s) =====\n{text[-LOG_CAP:]}\n")
    log.flush()
    got = json.load(open(path)) if os.path.exists(path) else {"status": "failed", "result": {}}
    if timed_out:
        got["status"] = "timeout"
        got["error"] = f"killed at its time box of {box:.0f} s; output tail:\n{text[-1500:]}"
    elif got["status"] != "ok" and "error" not in got:
        got["status"], got["error"] = "failed", f"exit status {rc}; output tail:\n{text[-1500:]}"
    return {"status": got["status"], "seconds": round(seconds, 2), "time_box_s": round(box), "result": got["result"],
            **({"error": got["error"]} if "error" in got else {})}


def run_all(args) -> int:
    os.makedirs(args.outdir, exist_ok=True)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run on CPU", file=sys.stderr)
            return 2
    start, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    rep = {"schema": 1, "mode": "dry-run" if args.dry_run else "gpu", "started_utc": start.isoformat(timespec="seconds"),
           "budget_s": args.budget_s, "steps": {}}
    keys = [k for k in STEPS if not args.only or k in args.only.split(",")]
    work = tempfile.mkdtemp(prefix="gpu_check_")
    with open(os.path.join(args.outdir, "gpu_check.log"), "a") as log:
        for key in keys:
            left = args.budget_s - (time.monotonic() - t0)
            box = min(STEPS[key][1 if args.dry_run else 0], left - 5)
            if box < MIN_STEP_S or (key == "c_actor_1.5b" and box < STEPS[key][1 if args.dry_run else 0]):
                res = {"status": "skipped", "seconds": 0.0, "result": {},
                       "error": f"not started: {left:.0f} s of the {args.budget_s:.0f} s budget left"}
            else:
                print(f"[gpu_check] {key} (time box {box:.0f} s) ...", flush=True)
                res = run_step(key, box, args, work, log)
            rep["steps"][key] = res
            if key == "d_environment" and res["status"] == "ok":
                args.matmul_tflops = res["result"].get("matmul_tflops")
            print(f"[gpu_check] {key}: {res['status']} in {res['seconds']:.1f} s", flush=True)
            rep["wall_s"] = round(time.monotonic() - t0, 1)
            report.write(rep, args.outdir)
    print(report.summary(rep), flush=True)
    return 0 if all(s["status"] == "ok" for s in rep["steps"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir", nargs="?")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, gloo")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of all steps")
    p.add_argument("--only", default="", help="comma list of step keys")
    p.add_argument("--render", metavar="JSON", help="re-render the markdown of a gpu_check.json (stdout or --into)")
    p.add_argument("--into", metavar="MD", help="with --render: replace the gpu_check block of this markdown file")
    p.add_argument("--run-step", choices=sorted(BODIES), help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--matmul-tflops", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_step:
        return run_child(args)
    if args.render:
        text = report.render(json.load(open(args.render)))
        if args.into:
            report.insert_block(args.into, text)
        else:
            print(text)
        return 0
    if not args.outdir:
        p.error("OUTDIR is required")
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
