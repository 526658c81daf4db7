"""The compiled (GPU) Triton path, checked without a GPU: every kernel variant compiles ahead of time to an sm_90 cubin.

The interpreter tests check the kernels' math; this checks that the same source passes Triton's compiler
(front end, TTGIR, LLVM, ptxas) for an H100 with the launch options used on CUDA, and that the bf16 gradient
store rounds to nearest even on the GPU (the interpreter needs a hand-written rounding for that).
"""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from rfpo_megatron.kernels import logprob_triton as L  # noqa: E402
from rfpo_megatron.kernels import loss_triton as S  # noqa: E402


def _compile(fn, signature, constexprs, **opts):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=triton.jit(fn), signature=signature, constexprs=constexprs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    except FileNotFoundError as e:  # pragma: no cover - a triton build without the bundled ptxas
        pytest.skip(f"triton's CUDA toolchain is not available: {e}")


def _resource_usage(kernel) -> str:
    """cuobjdump -res-usage line of a compiled kernel's cubin ('' when the tool is missing)."""
    import os
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):  # pragma: no cover
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return next((line.strip() for line in out.splitlines() if "REG:" in line), "")


def _fwd_sig(dtype):
    return {"logits_ptr": f"*{dtype}", "stride_row": "i64", "labels_ptr": "*i64", "m_ptr": "*fp32", "s_ptr": "*fp32",
            "a_ptr": "*fp32", "xt_ptr": "*fp32", "n_valid": "i32", "vocab_start": "i32", "inv_temp": "fp32",
            "BLOCK_V": "constexpr", "COMPUTE_ENTROPY": "constexpr"}


def _bwd_sig(dtype):
    return {"logits_ptr": f"*{dtype}", "stride_row": "i64", "grad_ptr": f"*{dtype}", "stride_grad_row": "i64",
            "labels_ptr": "*i64", "m_ptr": "*fp32", "logs_ptr": "*fp32", "ent_ptr": "*fp32", "glogp_ptr": "*fp32",
            "gent_ptr": "*fp32", "n_valid": "i32", "n_cols": "i32", "vocab_start": "i32", "inv_temp": "fp32",
            "BLOCK_V": "constexpr", "HAS_ENT_GRAD": "constexpr", "MANUAL_RTNE_BF16": "constexpr"}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_logprob_kernels_compile_for_sm90(dtype):
    block = 8192
    opts = L._launch_opts(block, on_cpu=False)
    assert opts == {"num_warps": 16, "enable_fp_fusion": True}
    kernels = []
    for ent in (True, False):
        kernels.append(_compile(L._fwd_kernel, _fwd_sig(dtype), {"BLOCK_V": block, "COMPUTE_ENTROPY": ent}, **opts))
    for ent in (True, False):
        k = _compile(L._bwd_kernel, _bwd_sig(dtype), {"BLOCK_V": block, "HAS_ENT_GRAD": ent, "MANUAL_RTNE_BF16": False},
                     **opts)
        kernels.append(k)
        if dtype == "bf16":  # the gradient store converts fp32 -> bf16 with round-to-nearest-even
            assert "cvt.rn.bf16" in k.asm["ptx"]
    for k in kernels:
        assert k.asm["cubin"]
        usage = _resource_usage(k)
        if usage:  # no register spills (local memory) and <= 128 registers/thread, so 512-thread blocks fit
            regs = int(usage.split("REG:")[1].split()[0])
            assert "LOCAL:0" in usage and regs <= 128, usage


def test_loss_kernels_compile_for_sm90():
    """Every specialisation the trainer can launch: dtype x loss form (faithful / corrected / weighted) x
    per-token TIS weights x dual clip."""
    base = {"logp_ptr": "*{t}", "old_ptr": "*{t}", "adv_ptr": "*{t}", "cu_ptr": "*i32", "lroff_ptr": "*{t}",
            "w_ptr": "*{t}", "loss_ptr": "*{t}", "coef_ptr": "*{t}", "ratio_ptr": "*{t}", "flag_ptr": "*i8",
            "lo": "constexpr", "hi": "constexpr", "clip_c": "constexpr", "CDT": "constexpr", "FAITHFUL": "constexpr",
            "WEIGHTED": "constexpr", "HAS_W": "constexpr", "DUAL": "constexpr", "BLOCK": "constexpr",
            "LOG_RATIO_CLAMP": "constexpr"}
    forms = [(True, False), (False, False), (False, True)]  # (FAITHFUL, WEIGHTED): faithful, corrected, weighted
    for t, cdt in (("fp32", tl.float32), ("fp64", tl.float64)):
        sig = {k: v.format(t=t) for k, v in base.items()}
        for faithful, weighted in forms:
            for has_w in (True, False):
                for dual in (True, False):
                    k = _compile(S._loss_kernel, sig, {"lo": 0.8, "hi": 1.28, "clip_c": 3.0, "CDT": cdt,
                                                       "FAITHFUL": faithful, "WEIGHTED": weighted, "HAS_W": has_w,
                                                       "DUAL": dual, "BLOCK": S.BLOCK,
                                                       "LOG_RATIO_CLAMP": S.LOG_RATIO_CLAMP}, **S.GPU_OPTS)
                    assert k.asm["cubin"]
        k = _compile(S._segsum_kernel, {"x_ptr": f"*{t}", "cu_ptr": "*i64", "out_ptr": f"*{t}", "CDT": "constexpr",
                                        "BLOCK": "constexpr"}, {"CDT": cdt, "BLOCK": S.BLOCK}, **S.GPU_OPTS)
        assert k.asm["cubin"]


def test_interpreter_works_when_triton_was_imported_first():
    """In a full test run another module may import triton before TRITON_INTERPRET=1 is set; the kernels must
    still run in the interpreter (they avoid triton's @jit stdlib helpers, which would be compile-only then)."""
    import os
    import subprocess
    import sys

    code = (
        "import os, torch, triton, triton.language\n"
        "assert 'TRITON_INTERPRET' not in os.environ\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from rfpo_megatron.kernels.logprob import vocab_parallel_logprobs_triton as f, vocab_parallel_logprobs_torch as g\n"
        "from rfpo_megatron.kernels.loss import fused_rfpo_token_loss_triton as lt, segment_sum_triton as st\n"
        "x = torch.randn(6, 300); y = torch.randint(0, 300, (6,))\n"
        "assert (f(x, y)[0] - g(x, y)[0]).abs().max() < 1e-5\n"
        "cu = torch.tensor([0, 2, 6]); z = torch.zeros(6)\n"
        "assert lt(z, z, torch.ones(6), cu, torch.zeros(2), 0.2, 0.2)[0].tolist() == [-1.0] * 6\n"
        "assert st(torch.ones(6), cu).tolist() == [2.0, 4.0]\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
