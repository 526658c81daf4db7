"""SGLang's own code as the other end of the rollout tests (not an imitation of it).

Modules of the pinned SGLang release (tools/fetch_sglang_ref.py unpacks its wheel under .cache/sglang-ref/,
`make setup` does it) are loaded by file path in a child process, without running sglang/__init__.py
(which needs a GPU build): the /generate schema `sglang.api.v1.api_types`, the weight payload decoder
`sglang.srt.utils.common.MultiprocessingSerializer` (after SGLang's `monkey_patch_torch_reductions`, as
its TP workers do) and the launch-line parser `sglang.srt.server_args.ServerArgs`. The router's CLI comes
from the installed sglang-router package. A child process keeps SGLang's import-time side effects out of
the test process and decodes tensor payloads the way a server does: in another process.

    run(op, **args) -> JSON answer; ops: generate_requests, generate_responses, decode, patch_constants,
    server_args, router_args
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tools"))
from fetch_sglang_ref import SGLANG_REF_VERSION, ref_dir  # noqa: E402

SERVER_FIELDS = ("enable_return_routed_experts", "model_path", "host", "port", "tp_size", "mem_fraction_static", "enable_memory_saver",
                 "enable_deterministic_inference", "allow_auto_truncate")
ROUTER_FIELDS = ("worker_urls", "host", "port", "prometheus_host", "prometheus_port", "health_check_endpoint",
                 "disable_retries", "request_timeout_secs", "health_check_interval_secs")


def available() -> str | None:
    """None when the pinned SGLang copy is unpacked, else what to run."""
    if os.path.isfile(os.path.join(ref_dir(), "sglang", "api", "v1", "api_types.py")):
        return None
    return (f"SGLang {SGLANG_REF_VERSION} reference copy missing under {ref_dir()}: run `make setup` "
            f"(or python tools/fetch_sglang_ref.py)")


def run(op: str, timeout: float = 120.0, **args: Any) -> Any:
    """Run one op in a child process with SGLang's modules; returns its JSON answer."""
    missing = available()
    if missing:
        raise RuntimeError(missing)
    import multiprocessing

    # CPU tensors travel as file descriptors that the child fetches from this process's resource sharer, which
    # checks the multiprocessing authkey: give the child ours (CUDA tensors use IPC handles instead)
    env = dict(os.environ, TRITON_INTERPRET="1", RFPO_MP_AUTHKEY=multiprocessing.current_process().authkey.hex())
    r = subprocess.run([sys.executable, os.path.abspath(__file__), op], input=json.dumps(args), text=True,
                       capture_output=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"sglang_ref {op} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- child side
def _load_sglang():
    import importlib
    import types

    pkg = types.ModuleType("sglang")
    pkg.__path__ = [os.path.join(ref_dir(), "sglang")]
    sys.modules["sglang"] = pkg
    return importlib.import_module


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _validate(struct: str, values: list) -> list:
    """None for each value SGLang's api_types.<struct> accepts, else its error message."""
    cls = getattr(_load_sglang()("sglang.api.v1.api_types"), struct)
    out = []
    for v in values:
        try:
            cls.from_json_value(v)
            out.append(None)
        except Exception as e:  # noqa: BLE001 - the schema's message is the answer
            out.append(_err(e))
    return out


def _op_generate_requests(bodies: list) -> list:
    return _validate("GenerateRequest", bodies)


def _op_generate_responses(replies: list) -> list:
    return _validate("GenerateResponse", replies)


def _op_decode(entries: list) -> list:
    """entries: base64 payload strings, each decoded once (as TP rank r of a server decodes entry [r])."""
    imp = _load_sglang()
    common = imp("sglang.srt.utils.common")
    imp("sglang.srt.utils.patch_torch").monkey_patch_torch_reductions()
    out = []
    for text in entries:
        try:
            items = common.MultiprocessingSerializer.deserialize(text)
            out.append({"names": [n for n, _ in items], "shapes": [list(t.shape) for _, t in items],
                        "dtypes": [str(t.dtype) for _, t in items],
                        "sums": [float(t.double().sum()) for _, t in items]})
        except Exception as e:  # noqa: BLE001
            out.append({"error": _err(e)})
    return out


def _op_patch_constants() -> dict:
    pt = _load_sglang()("sglang.srt.utils.patch_torch")
    return {"device_arg": pt._REDUCE_TENSOR_ARG_DEVICE_INDEX}


def _op_server_args(argvs: list) -> list:
    import argparse

    sa = _load_sglang()("sglang.srt.server_args")
    out = []
    for argv in argvs:
        p = argparse.ArgumentParser(allow_abbrev=False)  # an abbreviation (--tp) is not the flag (--tp-size)
        sa.ServerArgs.add_cli_args(p)
        try:
            ns = p.parse_args(argv)
            args = sa.ServerArgs.from_cli_args(ns)
            out.append({k: getattr(args, k, None) for k in SERVER_FIELDS})
        except (Exception, SystemExit) as e:  # noqa: BLE001 - argparse exits on a bad line
            out.append({"error": _err(e)})
    return out


def _op_router_args(argvs: list) -> list:
    from sglang_router.launch_router import parse_router_args

    out = []
    for argv in argvs:
        try:
            a = parse_router_args(argv)
            out.append({k: getattr(a, k, None) for k in ROUTER_FIELDS})
        except (Exception, SystemExit) as e:  # noqa: BLE001
            out.append({"error": _err(e)})
    return out


def _main() -> None:
    import multiprocessing

    if os.environ.get("RFPO_MP_AUTHKEY"):
        multiprocessing.current_process().authkey = bytes.fromhex(os.environ["RFPO_MP_AUTHKEY"])
    op = sys.argv[1]
    args = json.loads(sys.stdin.read() or "{}")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # SGLang's import-time prints stay out of the answer
        answer = globals()[f"_op_{op}"](**args)
    print(json.dumps(answer))


if __name__ == "__main__":
    _main()
