"""The GPU check's report: goals evaluated on the measurements, the markdown block for docs/benchmarks.md, JSON output.

`write(rep, outdir)` writes gpu_check.json and gpu_check.md; `render(rep)` is the markdown block, between
`BEGIN`/`END` markers, that `insert_block(path, text)` drops into docs/benchmarks.md's GPU section
(`python tools/gpu_check.py --render OUT/gpu_check.json --into docs/benchmarks.md`). `goals(rep)` gives the
issue's goals with what was measured and met (True / False / None = not measured); they are never asserted.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
GOAL_FLOOR = 0.75  # fwd+bwd >= 75 % of the copy-bandwidth floor at the largest shape
GOAL_SPEEDUP = 3.0  # >= 3x megatron-core's vocab_parallel_cross_entropy at the smallest shape
LIGER_H100 = "Liger's published H100 fused CE at N = 8192, V = 131072: 7.96 ms fwd+bwd, megatron's 18.23 ms"


def _f(x, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


def _res(rep: dict, key: str) -> dict:
    return (rep["steps"].get(key) or {}).get("result") or {}


def _bench(rep: dict):
    """(BenchReport of step b's rows, rows by (impl, n, v), shapes in measured order)."""
    from rfpo_megatron.kernels import bench

    env = _res(rep, "d_environment")
    rows = [bench.Result(**r) for r in _res(rep, "b_kernel_speed").get("rows", [])]
    rows.sort(key=lambda r: (r.n, r.v))  # stable: one block per shape, implementations in measured order
    br = bench.BenchReport(env.get("device", "?"), env.get("copy_gbps"), results=rows)
    shapes = list(dict.fromkeys((r.n, r.v) for r in rows))
    return br, {(r.impl, r.n, r.v): r for r in rows}, shapes


def goals(rep: dict) -> list[dict]:
    """[{goal, measured, met}] for the issue's goals."""
    from rfpo_megatron.kernels.bench import floor_ms

    br, by, shapes = _bench(rep)
    out = []
    big = max(shapes, key=lambda s: s[0] * s[1]) if shapes else None
    small = min(shapes, key=lambda s: s[0] * s[1]) if shapes else None
    f = by.get(("fused", *big)) if big else None
    goal = f"fused fwd+bwd at N = {big[0] if big else '?'}, V = {big[1] if big else '?'} ≥ {GOAL_FLOOR:.0%} of the bandwidth floor"
    if f and f.fwdbwd_ms and br.copy_gbps:
        fl = floor_ms(f.n, f.v, br.copy_gbps, True)
        out.append(dict(goal=goal, met=fl / f.fwdbwd_ms >= GOAL_FLOOR,
                        measured=f"{fl / f.fwdbwd_ms:.1%} ({f.fwdbwd_ms:.3f} ms vs floor {fl:.3f} ms at {br.copy_gbps:.0f} GB/s)"))
    else:
        out.append(dict(goal=goal, met=None, measured="not measured"))
    f, m = (by.get(("fused", *small)), by.get(("megatron", *small))) if small else (None, None)
    mf = by.get(("megatron_fused", *small)) if small else None
    goal = f"fused fwd+bwd ≥ {GOAL_SPEEDUP:.0f}× megatron-core vocab_parallel_cross_entropy at N = {small[0] if small else '?'}, V = {small[1] if small else '?'}"
    if f and m and f.fwdbwd_ms and m.fwdbwd_ms:
        extra = f"; megatron fused CE {mf.fwdbwd_ms:.3f} ms" if mf and mf.fwdbwd_ms else ""
        out.append(dict(goal=goal, met=m.fwdbwd_ms / f.fwdbwd_ms >= GOAL_SPEEDUP,
                        measured=f"{m.fwdbwd_ms / f.fwdbwd_ms:.2f}× ({f.fwdbwd_ms:.3f} ms vs {m.fwdbwd_ms:.3f} ms{extra}; "
                                 f"{LIGER_H100})"))
    else:
        out.append(dict(goal=goal, met=None, measured="not measured"))
    mem = [by.get(("fused", *s)) for s in shapes]
    mem = [r for r in mem if r and r.peak_extra_bytes is not None]
    goal = "fused fwd+bwd peak extra memory ≤ one bf16 [N, V] + O(N) (2·N·V + 64·N bytes + 1 MiB)"
    if mem:
        ok = all(r.peak_extra_bytes <= 2 * r.n * r.v + 64 * r.n + (1 << 20) for r in mem)
        out.append(dict(goal=goal, met=ok, measured=", ".join(
            f"{r.peak_extra_bytes / (2 * r.n * r.v):.3f}× bf16 [N, V] at N = {r.n}" for r in mem)))
    else:
        out.append(dict(goal=goal, met=None, measured="not measured (CPU)" if shapes else "not measured"))
    checks = [c for c in _res(rep, "a_kernel_correctness").get("checks", []) if c.get("kind") == "logprobs"]
    goal = "log-probs / entropies vs float64 within 1e-4; gradients within one bf16 rounding (err / bound ≤ 1)"
    if checks:
        out.append(dict(goal=goal, met=all(c["ok"] for c in checks), measured=(
            f"max |Δlogp| {max(c['logp_max_abs_err'] for c in checks):.2e}, max |Δentropy| "
            f"{max(c['entropy_max_abs_err'] for c in checks):.2e}, grad err / bound ≤ "
            f"{max(c['grad_max_err_over_bound'] for c in checks):.3f}")))
    else:
        out.append(dict(goal=goal, met=None, measured="not measured"))
    return out


def _met(x) -> str:
    return "not measured" if x is None else ("**met**" if x else "**not met**")


def _table(head: list[str], rows: list[list]) -> list[str]:
    cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731 - a literal | would split the cell
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(cell, r)) + " |" for r in rows]


def _correctness(rep: dict) -> list[str]:
    rows = []
    for c in _res(rep, "a_kernel_correctness").get("checks", []):
        g = c.get
        if g("kind") == "logprobs":
            name = (f"log-probs {g('dtype')}{' in-place bwd' if g('inplace') else ''}, N={g('n')}, V={g('vocab')} "
                    f"(padded {g('v_padded')}), T={g('temperature')}")
            errs = [_f(g("logp_max_abs_err"), ".1e"), _f(g("entropy_max_abs_err"), ".1e"), _f(g("grad_max_abs_err"), ".1e"),
                    _f(g("grad_max_err_over_bound"), ".3f")]
        else:
            name = f"token loss ({g('form')}, dual clip, R_off), N={g('n')}, S={g('n_seq')}"
            errs = [_f(g("loss_max_abs_err"), ".1e"), "–", _f(g("grad_max_abs_err"), ".1e"),
                    _f(g("grad_max_err_over_bound"), ".3f")]
        rows.append([name, *errs, "yes" if g("ok") else "**NO**"])
    return _table(["check (Triton vs float64)", "max abs err (logp / loss)", "entropy", "grad", "grad err / bound", "ok"], rows)


def _actor(rep: dict) -> list[str]:
    rows = []
    for key in ("c_actor_0.5b", "c_actor_1.5b"):
        r = _res(rep, key)
        if not r.get("model"):
            continue
        rows.append([
            f"{key[8:]} ({r['model']}, {r['params'] / 1e6:.1f} M params, {'bf16' if r['bf16'] else 'fp32'}, "
            f"dist-opt {'on' if r['distributed_optimizer'] else 'off'})",
            f"{r.get('tokens', '–')} ({r.get('micro_batches', '–')} mb, pad eff. {_f(r.get('pad_efficiency'), '.2f')})",
            f"{_f(r.get('logprobs_s'), '.3f')} / {_f(r.get('logprobs_tokens_per_s'), '.0f')} / {_f(r.get('logprobs_mfu'), '.1%')}",
            f"{_f(r.get('train_step_s'), '.3f')} / {_f(r.get('train_tokens_per_s'), '.0f')} / {_f(r.get('train_mfu'), '.1%')}",
            _f(r.get("peak_allocated_gib"), ".1f"), _f(r.get("logprob_vs_fp64_max_abs_err"), ".1e")])
    return _table(["model", "tokens / step", "compute_logprobs s / tok/s / MFU", "train_step s / tok/s / MFU",
                   "peak GiB", "logp vs fp64"], rows)


def render(rep: dict) -> str:
    """The markdown block (with BEGIN/END markers) for the GPU section of docs/benchmarks.md."""
    from rfpo_megatron.kernels import bench

    env = _res(rep, "d_environment")
    v = env.get("versions", {})
    dry = rep.get("mode") == "dry-run"
    lines = [BEGIN, f"### GPU check — {env.get('date_utc', rep.get('started_utc', '?'))} UTC — {env.get('device', '?')}"
             + (" — DRY RUN" if dry else ""), ""]
    lines.append(
        f"`tools/gpu_check.sh` ({rep.get('mode')}, {rep.get('wall_s', '?')} s of a {rep.get('budget_s', '?'):.0f} s budget). "
        f"Driver {env.get('driver') or '–'}, CUDA {env.get('cuda') or '–'}, Python {v.get('python', '?')}, torch "
        f"{v.get('torch', '?')}, triton {v.get('triton', '?')}, megatron-core {v.get('megatron-core', '?')}; wheels: "
        f"{env.get('install', '?')}. Measured ceilings: copy {_f(env.get('copy_gbps'), '.0f')} GB/s (read + write), "
        f"{env.get('matmul_dtype', '')} matmul {_f(env.get('matmul_tflops'), '.4g')} TFLOP/s.")
    lines += ["", *_table(["step", "status", "seconds (box)", "note"], [
        [k, s["status"], f"{s['seconds']:.1f} ({s.get('time_box_s', '–')})",
         (s.get("error") or "").strip().splitlines()[-1][:160] if s.get("error") else ""]
        for k, s in rep["steps"].items()])]
    lines += ["", "Goals (issue 19):", "", *_table(["goal", "measured", "met"], [
        [g["goal"], g["measured"], _met(g["met"])] for g in goals(rep)])]
    lines += ["", "(a) Kernel correctness:", "", *_correctness(rep)]
    br, _, _ = _bench(rep)
    if br.results:
        lines += ["", "(b) Kernel speed and memory (bf16 logits, TP = 1, median of do_bench; % of floor = "
                      "3·N·V·2 bytes / copy bandwidth over the time):", "", bench.format_table(br)]
    lines += ["", "(c) Actor step (random Qwen2.5-shaped model, TP = 1, local spec, pad-layout packing; median of 3 "
                  "timed steps after one warm-up; MFU = model FLOPs / time / measured matmul rate):", "", *_actor(rep)]
    for k, s in rep["steps"].items():
        if s["status"] != "ok" and s.get("error"):
            tail = "\n".join(s["error"].strip().splitlines()[-12:])
            lines += ["", f"`{k}` {s['status']}:", "", "```", tail, "```"]
    lines.append(END)
    return "\n".join(lines) + "\n"


def insert_block(path: str, text: str) -> None:
    """Replace the BEGIN..END block of the markdown file at `path` with `text` (which carries its markers)."""
    doc = open(path, encoding="utf-8").read()
    i, j = doc.find(BEGIN), doc.find(END)
    if i < 0 or j < i:
        raise ValueError(f"{path} has no {BEGIN} ... {END} block to replace")
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc[:i] + text.rstrip("\n") + doc[j + len(END):])


def summary(rep: dict) -> str:
    """A short plain-text summary for the console (the device call returns only the output's tail)."""
    out = [f"gpu_check {rep.get('mode')}: {rep.get('wall_s', '?')} s"]
    out += [f"  {k:<22} {s['status']:<8} {s['seconds']:7.1f} s" for k, s in rep["steps"].items()]
    out += [f"  goal: {g['goal']}: {g['measured']} -> {_met(g['met'])}" for g in goals(rep)]
    return "\n".join(out)


def write(rep: dict, outdir: str) -> None:
    """OUTDIR/gpu_check.json and OUTDIR/gpu_check.md (atomic replace)."""
    try:
        md = render(rep)
    except Exception:  # noqa: BLE001 - a rendering bug must not cost the measurements
        import traceback

        md = f"{BEGIN}\nrendering failed:\n```\n{traceback.format_exc()[-3000:]}```\n{END}\n"
    for name, text in (("gpu_check.json", json.dumps(rep, indent=1, default=str)), ("gpu_check.md", md)):
        tmp = os.path.join(outdir, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(outdir, name))
