"""GPU benchmark of the fused log-prob kernel vs naive torch, megatron-core and Liger: time, peak memory, bandwidth floor.

`rfpo-megatron bench [--n 8192 32768] [--v 131072 152064] [--out docs/benchmarks.md]` (also
`python tools/bench_kernels.py ...`). For every (N, V), bf16 logits [N, V], TP = 1, it measures with
`triton.testing.do_bench` the median forward and forward+backward time of:

- `fused`            vocab_parallel_logprobs (Triton), log-probs only
- `fused+entropy`    the same with the entropy output and its gradient
- `fused(inplace)`   log-probs only, gradient written into the logits' storage
- `naive`            logits.float().log_softmax(-1).gather(...)
- `megatron`         -megatron.core.tensor_parallel.vocab_parallel_cross_entropy (megatron-core)
- `megatron_fused`   -megatron.core.fusions.fused_cross_entropy.fused_vocab_parallel_cross_entropy (torch.compile'd)
- `liger`            -LigerCrossEntropyLoss(reduction="none") (only when liger-kernel is installed)

plus the peak extra memory of one forward+backward (torch.cuda.max_memory_allocated above the inputs). It
measures the device's copy bandwidth in the same run; the floor of a forward+backward is 3·N·V·2 bytes (read
logits twice, write the gradient once) over that bandwidth, of a forward N·V·2 bytes. Results are printed
and appended as a dated markdown table (with the device name) to `--out`.

On a machine without CUDA it exits with status 2 and says so (`--cpu-smoke` runs tiny shapes on the CPU
only to exercise this code path in tests; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

IMPLS = ("fused", "fused+entropy", "fused(inplace)", "naive", "megatron", "megatron_fused", "liger")
GOAL_FLOOR_FRAC = 0.75  # fwd+bwd >= 75 % of the bandwidth floor at N = 32768, V = 152064 (issue 19)
GOAL_SPEEDUP = 3.0  # fwd+bwd >= 3x faster than megatron-core at N = 8192, V = 131072


@dataclass
class Result:
    """One benchmark row (times in ms, memory in bytes; None = not measured)."""

    impl: str
    n: int
    v: int
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    peak_extra_bytes: int | None = None
    max_abs_err: float | None = None  # |logp - naive fp32 logp| on a row sample
    note: str = ""


@dataclass
class BenchReport:
    """Everything one run measured."""

    device: str
    copy_gbps: float | None
    results: list[Result] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- timing
def _time_ms(fn: Callable[[], object], on_gpu: bool, warmup: int, rep: int) -> float:
    if on_gpu:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    times = []
    for i in range(3 + 1):  # CPU smoke only: a rough median of 3
        t0 = time.perf_counter()
        fn()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(nbytes: int = 1 << 31, warmup: int = 25, rep: int = 200) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write counted), median of do_bench."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = _time_ms(lambda: b.copy_(a), True, warmup, rep)
    del a, b
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192, warmup: int = 25, rep: int = 200) -> float:
    """Measured dense bf16 matmul rate in TFLOP/s: median of do_bench over an [n, n] @ [n, n] product of random data."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    ms = _time_ms(lambda: a @ b, True, warmup, rep)
    del a, b
    return 2 * n**3 / (ms * 1e-3) / 1e12


def floor_ms(n: int, v: int, gbps: float, backward: bool) -> float:
    """Bandwidth floor in ms: forward reads N·V bf16 once; forward+backward moves 3·N·V·2 bytes."""
    nbytes = (3 if backward else 1) * n * v * 2
    return nbytes / (gbps * 1e9) * 1e3


# ----------------------------------------------------------------------------------------- implementations
_MEGATRON_READY = False


def _megatron_ce(device: str):
    global _MEGATRON_READY
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if not _MEGATRON_READY:
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        _MEGATRON_READY = True
    return vocab_parallel_cross_entropy


def _liger_ce():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss = LigerCrossEntropyLoss(reduction="none")

    def fn(logits, labels):
        out = loss(logits, labels)
        if not isinstance(out, torch.Tensor):  # newer versions return a (loss, ...) output object
            out = out[0] if isinstance(out, (tuple, list)) else out.loss
        return -out

    return fn


def make_impl(name: str, device: str = "cuda") -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """impl(logits [N, V] bf16, labels [N]) -> (logp [N], objective [N] the backward is taken of);
    ImportError when the backing library is missing."""
    from .logprob import vocab_parallel_logprobs

    if name == "fused":
        def fused(x, y):
            lp = vocab_parallel_logprobs(x, y, compute_entropy=False)[0]
            return lp, lp

        return fused
    if name == "fused+entropy":
        def with_entropy(x, y):
            lp, ent = vocab_parallel_logprobs(x, y, compute_entropy=True)
            return lp, lp + 0.01 * ent  # both outputs feed the backward

        return with_entropy
    if name == "fused(inplace)":  # the backward overwrites the logits with their gradient (timing only)
        def inplace(x, y):
            lp = vocab_parallel_logprobs(x, y, compute_entropy=False, inplace_backward=True)[0]
            return lp, lp

        return inplace
    if name == "naive":
        def naive(x, y):
            lp = x.float().log_softmax(-1).gather(1, y[:, None])[:, 0]
            return lp, lp

        return naive
    if name == "megatron":
        ce = _megatron_ce(device)

        def mega(x, y):
            lp = -ce(x, y)
            return lp, lp

        return mega
    if name == "megatron_fused":
        _megatron_ce(device)  # initialises the process group and the TP = 1 groups
        from megatron.core import parallel_state
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        group = parallel_state.get_tensor_model_parallel_group()

        def mega_fused(x, y):
            lp = -fused_vocab_parallel_cross_entropy(x, y, group)
            return lp, lp

        return mega_fused
    if name == "liger":
        liger = _liger_ce()

        def lig(x, y):
            lp = liger(x, y)
            return lp, lp

        return lig
    raise ValueError(f"unknown impl {name!r}; choose from {IMPLS}")


# ----------------------------------------------------------------------------------------------- measuring
def _measure(name: str, n: int, v: int, device: str, warmup: int, rep: int, seed: int = 0) -> Result:
    res = Result(name, n, v)
    on_gpu = device == "cuda"
    try:
        fn = make_impl(name, device)
    except ImportError as e:
        res.note = f"skipped: {e.__class__.__name__}: {e}"
        return res
    g = torch.Generator(device=device).manual_seed(seed)
    try:
        logits = torch.randn(n, v, device=device, dtype=torch.bfloat16, generator=g) * 2
        labels = torch.randint(0, v, (n,), device=device, generator=g)
        # correctness sample against fp32 torch on 256 rows (before any in-place implementation runs)
        rows = slice(0, min(n, 256))
        ref = logits[rows].float().log_softmax(-1).gather(1, labels[rows, None])[:, 0]
        with torch.no_grad():
            got = fn(logits[rows].clone(), labels[rows])[0]
        res.max_abs_err = float((got.float() - ref).abs().max())
        del ref, got

        def fwd():
            with torch.no_grad():
                fn(logits, labels)

        res.fwd_ms = _time_ms(fwd, on_gpu, warmup, rep)
        x = logits.detach().requires_grad_()

        def fwdbwd():
            obj = fn(x, labels)[1]
            torch.autograd.grad(obj.sum(), x)

        res.fwdbwd_ms = _time_ms(fwdbwd, on_gpu, warmup, rep)
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwdbwd()
            torch.cuda.synchronize()
            res.peak_extra_bytes = int(torch.cuda.max_memory_allocated() - base)
    except torch.OutOfMemoryError:
        res.note = "OOM"
    finally:
        logits = x = labels = None  # noqa: F841
        if on_gpu:
            torch.cuda.empty_cache()
    return res


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for mod in ("triton", "megatron.core", "liger_kernel"):
        try:
            m = __import__(mod, fromlist=["_"])
            out[mod] = getattr(m, "__version__", "?")
        except ImportError:
            pass
    return out


# ---------------------------------------------------------------------------------------------- reporting
def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def format_table(report: BenchReport) -> str:
    """Markdown table of the results: times, achieved GB/s, % of the bandwidth floor, memory, speedups."""
    head = ("| impl | N | V | fwd ms | fwd+bwd ms | fwd+bwd GB/s | % of floor | peak extra GiB | "
            "peak / bf16[N,V] | ×megatron fwd+bwd | max abs err | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    mega = {(r.n, r.v): r.fwdbwd_ms for r in report.results if r.impl == "megatron" and r.fwdbwd_ms}
    for r in report.results:
        gbps = frac = None
        if r.fwdbwd_ms:
            gbps = 3 * r.n * r.v * 2 / (r.fwdbwd_ms * 1e-3) / 1e9
            if report.copy_gbps:
                frac = floor_ms(r.n, r.v, report.copy_gbps, True) / r.fwdbwd_ms
        peak = None if r.peak_extra_bytes is None else r.peak_extra_bytes / 2**30
        rel = None if r.peak_extra_bytes is None else r.peak_extra_bytes / (2 * r.n * r.v)
        speed = mega[(r.n, r.v)] / r.fwdbwd_ms if (r.n, r.v) in mega and r.fwdbwd_ms else None
        lines.append(
            f"| {r.impl} | {r.n} | {r.v} | {_fmt(r.fwd_ms, '.3f')} | {_fmt(r.fwdbwd_ms, '.3f')} | {_fmt(gbps, '.0f')} | "
            f"{_fmt(None if frac is None else 100 * frac, '.1f')} | {_fmt(peak, '.2f')} | {_fmt(rel, '.2f')} | "
            f"{_fmt(speed, '.2f')} | {_fmt(r.max_abs_err, '.1e')} | {r.note} |"
        )
    return "\n".join(lines)


def goal_lines(report: BenchReport) -> list[str]:
    """The issue's goals, evaluated on what was measured (goals, not assertions)."""
    out = []
    by = {(r.impl, r.n, r.v): r for r in report.results}
    f = by.get(("fused", 32768, 152064))
    if f and f.fwdbwd_ms and report.copy_gbps:
        frac = floor_ms(f.n, f.v, report.copy_gbps, True) / f.fwdbwd_ms
        out.append(f"- fwd+bwd at N=32768, V=152064: {100 * frac:.1f} % of the bandwidth floor "
                   f"(goal ≥ {100 * GOAL_FLOOR_FRAC:.0f} %: {'met' if frac >= GOAL_FLOOR_FRAC else 'not met'})")
    f, m = by.get(("fused", 8192, 131072)), by.get(("megatron", 8192, 131072))
    if f and m and f.fwdbwd_ms and m.fwdbwd_ms:
        s = m.fwdbwd_ms / f.fwdbwd_ms
        out.append(f"- fwd+bwd at N=8192, V=131072: {s:.2f}× megatron-core vocab_parallel_cross_entropy "
                   f"(goal ≥ {GOAL_SPEEDUP:.0f}×: {'met' if s >= GOAL_SPEEDUP else 'not met'})")
    for r in report.results:
        if r.impl in ("fused", "fused+entropy") and r.peak_extra_bytes is not None:
            ok = r.peak_extra_bytes <= 2 * r.n * r.v + 64 * r.n
            out.append(f"- {r.impl} N={r.n} V={r.v}: peak extra {r.peak_extra_bytes / 2**30:.2f} GiB "
                       f"≤ one bf16 [N, V] + O(N): {'yes' if ok else 'NO'}")
    return out


def render_markdown(report: BenchReport, when: _dt.datetime | None = None) -> str:
    """The dated section appended to docs/benchmarks.md."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    vers = ", ".join(f"{k} {v}" for k, v in report.versions.items())
    bw = "–" if report.copy_gbps is None else f"{report.copy_gbps:.0f} GB/s"
    parts = [
        f"## Fused log-prob kernel — {when:%Y-%m-%d %H:%M} UTC — {report.device}",
        "",
        f"`rfpo-megatron bench`, bf16 logits, TP = 1, medians of triton.testing.do_bench. Copy bandwidth "
        f"(same run): {bw}. Floor of fwd+bwd = 3·N·V·2 bytes / copy bandwidth. Versions: {vers}.",
        "",
        format_table(report),
        "",
    ]
    goals = goal_lines(report)
    if goals:
        parts += ["Goals:", *goals, ""]
    return "\n".join(parts) + "\n"


def append_markdown(path: str, text: str) -> None:
    """Append `text` to the markdown file at `path` (created with a title when missing)."""
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write("# Benchmarks\n\n")
        f.write("\n" + text)


# ---------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rfpo-megatron bench", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[8192, 32768], help="token counts N")
    p.add_argument("--v", type=int, nargs="+", default=[131072, 152064], help="vocab sizes V")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list from {','.join(IMPLS)}")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown file the dated table is appended to")
    p.add_argument("--no-append", action="store_true", help="print only; do not write --out")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rfpo-megatron bench`; returns the exit status (2 without a CUDA device)."""
    args = _parser().parse_args(argv)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in impls if s not in IMPLS]
    if bad:
        print(f"rfpo-megatron bench: --impls has unknown {bad}; choose from {','.join(IMPLS)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("rfpo-megatron bench: needs a CUDA GPU (torch.cuda.is_available() is False). The kernels' CPU "
              "checks are the tests: pytest tests/test_kernels_*.py", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        print(f"device: {name}; measuring copy bandwidth ...", flush=True)
        report = BenchReport(name, copy_bandwidth_gbps(warmup=args.warmup, rep=args.rep), versions=_versions())
    else:
        os.environ.setdefault("RFPO_KERNEL_BACKEND", "torch")
        report = BenchReport("cpu (smoke test; numbers are meaningless)", None, versions=_versions())
    for n in args.n:
        for v in args.v:
            for impl in impls:
                r = _measure(impl, n, v, device, args.warmup, args.rep)
                report.results.append(r)
                print(f"{impl:>15} N={n} V={v}: fwd {_fmt(r.fwd_ms, '.3f')} ms, fwd+bwd {_fmt(r.fwdbwd_ms, '.3f')} ms "
                      f"{r.note}", flush=True)
    text = render_markdown(report)
    print("\n" + text)
    if not args.no_append:
        append_markdown(args.out, text)
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
