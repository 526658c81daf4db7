"""Child side of tests/test_rollout_sglang_app.py: SGLang's own FastAPI `app` behind a recording tokenizer manager.

Runs under the SGLang app venv (tools/sglang_app_env.sh: the pinned sglang wheel installed --no-deps with the CPU
packages http_server.py imports), never under the project venv. It imports the real
`sglang.srt.entrypoints.http_server`, publishes a real `ServerArgs` (CPU, a config-only model dir), sets the app up as
`_setup_and_run_http_server` does in single-tokenizer mode, replaces the global tokenizer manager with
`RecordingTokenizerManager`, and posts the given calls through a FastAPI TestClient. Everything between the HTTP
body and the tokenizer manager is SGLang's code: routing, the /generate contract check (sglang.api.v1 schema),
FastAPI's dataclass parsing of the io_struct request objects, the handlers' status codes and JSON replies.

The fake answers like the real TokenizerManager + scheduler would on an idle server: /generate normalises the
request (`GenerateReqInput.normalize_batch_and_arguments`), builds SGLang's `SamplingParams` for every item and runs
its `normalize`/`verify` (as `_create_tokenized_object` does), and returns SGLang-shaped outputs; weight updates keep
the 0.5.21+ session rule of the scheduler's weight_updater (tensor/distributed updates only between
begin_weight_update and end_weight_update, same messages); tensor payloads are normalised with SGLang's
`normalize_serialized_named_tensor_payloads` and every TP rank decodes its own entry with `MultiprocessingSerializer`
after `monkey_patch_torch_reductions` (tp_worker.deserialize_own_rank).

    python tests/sglang_app_child.py check          # import the app, print {"ok": true, ...}
    python tests/sglang_app_child.py run < spec.json # spec: {"calls": [...], "tp_size": int, "vocab_size": int}
        call: {"name", "method", "path", "json" (body or null)}; answer: one JSON line, a list with per call
        {"name", "status", "reply", "recorded": [what the fake received]}
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
import types


# ---------------------------------------------------------------------------------------------- torchvision stub
class _Dummy:
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return self

    def __getattr__(self, name):
        return _Dummy()


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An empty `torchvision` for SGLang's own module-level imports only (multimodal preprocessing).

    PyPI has no CPU torchvision for the CPU torch of this venv (its wheels link libtorch_cuda), and a real one is
    not needed by any endpoint tested here. The stub is served only when the importing frame is an SGLang file, so
    transformers' availability probe (importlib.util.find_spec) still sees no torchvision."""

    def __init__(self, sglang_dir: str):
        self.prefix = sglang_dir.rstrip(os.sep) + os.sep

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "torchvision":
            return None
        f = sys._getframe(1)
        while f is not None and (f.f_code.co_filename.startswith("<frozen") or "importlib" in f.f_code.co_filename):
            f = f.f_back
        if f is not None and f.f_code.co_filename.startswith(self.prefix):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__ = []
        m.__getattr__ = lambda attr: _Dummy if attr[:1].isupper() else _Dummy()
        return m

    def exec_module(self, module):
        pass


def load_http_server():
    """SGLang's http_server module (the installed sglang package of this venv)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None:
        raise SystemExit("sglang is not installed in this interpreter; run tools/sglang_app_env.sh")
    sys.meta_path.append(_TorchvisionStub(list(spec.submodule_search_locations)[0]))
    with contextlib.redirect_stdout(sys.stderr):
        from sglang.srt.entrypoints import http_server
    return http_server


# ---------------------------------------------------------------------------------------------- recording fake
def plain(x, depth: int = 0):
    """JSON-able view of a request object (long strings and bytes shortened, tensors described)."""
    if depth > 6:
        return repr(x)[:80]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: plain(getattr(x, f.name), depth + 1) for f in dataclasses.fields(x)}
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, str):
        return x if len(x) <= 200 else f"<str len={len(x)}>"
    if isinstance(x, (bytes, bytearray, memoryview)):
        return f"<bytes len={len(bytes(x))}>"
    if isinstance(x, (bool, int, float)) or x is None:
        return x
    if isinstance(x, dict):
        return {str(k): plain(v, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        items = sorted(x) if isinstance(x, set) else x
        return [plain(v, depth + 1) for v in items]
    if hasattr(x, "__struct_fields__"):  # msgspec.Struct (SGLang's SamplingParams)
        return {k: plain(getattr(x, k), depth + 1) for k in x.__struct_fields__}
    return repr(x)[:200]


class RecordingTokenizerManager:
    """Stands in for TokenizerManager (+ scheduler) of an idle generation server; records every request object."""

    def __init__(self, server_args, tp_size: int, vocab_size: int):
        from sglang.srt.managers.tokenizer_manager import ServerStatus

        self.server_args = server_args
        self.tp_size = int(tp_size)
        self.vocab_size = int(vocab_size)
        self.records: list[dict] = []
        self.session_open = False
        self.gracefully_exit = False
        self.server_status = ServerStatus.Up
        self.is_generation = True
        self.last_receive_tstamp = 0.0
        self.rid_to_state: dict = {}
        self.startup_time = time.time()
        self.model_path = server_args.model_path

    def _record(self, call: str, obj, **extra) -> None:
        self.records.append({"call": call, "obj": plain(obj), **extra})

    # -- generation
    def generate_request(self, obj, request=None):
        from sglang.srt.sampling.sampling_params import SamplingParams

        async def gen():
            obj.normalize_batch_and_arguments()  # first thing TokenizerManager.generate_request does
            subs = [obj] if obj.is_single else [obj[i] for i in range(obj.batch_size)]
            items, outs = [], []
            for sub in subs:
                sp = SamplingParams(**dict(sub.sampling_params or {}))  # _create_tokenized_object
                sp.normalize(None)
                sp.verify(self.vocab_size)
                ids = list(sub.input_ids) if sub.input_ids is not None else None
                items.append({"rid": sub.rid, "input_ids": ids, "return_logprob": sub.return_logprob,
                              "logprob_start_len": sub.logprob_start_len, "sampling_params_in": plain(sub.sampling_params),
                              "sampling_params": plain(sp), "stream": sub.stream})
                k = max(1, min(int(sp.max_new_tokens or 1), 3))
                out_ids = [(len(ids or []) + j) % self.vocab_size for j in range(k)]
                outs.append({
                    "text": "", "output_ids": out_ids,
                    "meta_info": {"id": sub.rid, "finish_reason": {"type": "length", "length": k},
                                  "prompt_tokens": len(ids or []), "completion_tokens": k, "cached_tokens": 0,
                                  "weight_version": "default",
                                  "output_token_logprobs": [[-0.5 - 0.1 * j, t, None] for j, t in enumerate(out_ids)]},
                })
            self.last_receive_tstamp = time.time()
            self._record("generate_request", None, is_single=obj.is_single, batch_size=obj.batch_size, items=items)
            yield outs[0] if obj.is_single else outs

        return gen()

    def create_abort_task(self, obj):
        return None

    def abort_request(self, rid: str = "", abort_all: bool = False):
        self._record("abort_request", None, rid=rid, abort_all=abort_all)

    async def get_internal_state(self):
        return [{"last_gen_throughput": 0.0, "memory_usage": {}}]

    async def flush_cache(self, timeout_s=None):
        from sglang.srt.managers.io_struct import FlushCacheReqOutput

        self._record("flush_cache", None, timeout_s=timeout_s)
        return FlushCacheReqOutput(success=True)

    # -- weights
    async def begin_weight_update(self, obj, request=None):
        self._record("begin_weight_update", obj)
        if self.session_open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session_open = True
        return True, "Success"

    async def end_weight_update(self, obj, request=None):
        self._record("end_weight_update", obj)
        if not self.session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session_open = False
        return True, "Success"

    async def update_weights_from_tensor(self, obj, request=None):
        from sglang.srt.utils.common import MultiprocessingSerializer, normalize_serialized_named_tensor_payloads
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        entries = list(obj.serialized_named_tensors)
        obj.serialized_named_tensors = normalize_serialized_named_tensor_payloads(obj.serialized_named_tensors)
        ranks = []
        if self.session_open:
            monkey_patch_torch_reductions()
            for r in range(self.tp_size):  # tp_worker.deserialize_own_rank: rank r reads entry [r] only
                try:
                    items = MultiprocessingSerializer.deserialize(obj.serialized_named_tensors[r])
                    ranks.append({"names": [n for n, _ in items], "dtypes": [str(t.dtype) for _, t in items],
                                  "shapes": [list(t.shape) for _, t in items],
                                  "sums": [float(t.double().sum()) for _, t in items]})
                except Exception as e:  # noqa: BLE001 - the scheduler would fail the update with this
                    ranks.append({"error": f"{type(e).__name__}: {e}"})
        self._record("update_weights_from_tensor", obj, entries=len(entries),
                     entry_types=sorted({type(e).__name__ for e in entries}), ranks=ranks)
        if not self.session_open:
            return False, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
        bad = [r for r in ranks if "error" in r]
        if bad:
            return False, f"Failed to update weights: {bad[0]['error']}"
        return True, "Success"

    async def update_weights_from_disk(self, obj, request=None):
        self._record("update_weights_from_disk", obj)
        return True, "Succeeded to update model weights.", 0

    async def init_weights_update_group(self, obj, request=None):
        self._record("init_weights_update_group", obj)
        return True, "Succeeded to initialize custom process group."

    async def destroy_weights_update_group(self, obj, request=None):
        self._record("destroy_weights_update_group", obj)
        return True, "Succeeded to destroy custom process group."

    async def update_weights_from_distributed(self, obj, request=None):
        import torch

        self._record("update_weights_from_distributed", obj)
        if not self.session_open:
            return False, ("update_weights_from_distributed must run between begin_weight_update() and "
                           "end_weight_update()")
        for d in obj.dtypes:  # the receiving side builds torch.empty(shape, dtype=getattr(torch, d))
            if not isinstance(getattr(torch, str(d), None), torch.dtype):
                return False, f"Failed to receive weights: unknown dtype {d}"
        return True, "Succeeded to update parameter online."

    # -- memory
    async def release_memory_occupation(self, obj, request=None):
        self._record("release_memory_occupation", obj)

    async def resume_memory_occupation(self, obj, request=None):
        self._record("resume_memory_occupation", obj)


# ---------------------------------------------------------------------------------------------- driver
def _tiny_model_dir() -> str:
    d = tempfile.mkdtemp(prefix="sglang-app-model-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
                   "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 512,
                   "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "torch_dtype": "float32",
                   "tie_word_embeddings": True}, f)
    return d


def build_app(tp_size: int, vocab_size: int):
    """(TestClient, fake tokenizer manager, http_server module) set up like _setup_and_run_http_server."""
    hs = load_http_server()
    from fastapi.testclient import TestClient
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    with contextlib.redirect_stdout(sys.stderr):
        server_args = ServerArgs(model_path=_tiny_model_dir(), tp_size=int(tp_size), device="cpu",
                                 enable_memory_saver=True)
        publish(server_args, role="tokenizer")
    tm = RecordingTokenizerManager(server_args, tp_size, vocab_size)
    hs.set_global_state(hs._GlobalState(tokenizer_manager=tm, template_manager=None,
                                        scheduler_info={"max_req_input_len": 512}))
    hs.app.is_single_tokenizer_mode = True
    hs.app.server_args = server_args
    if hs.app_has_admin_force_endpoints(hs.app):  # as _setup_and_run_http_server does with no API keys
        from sglang.srt.utils.auth import add_api_key_middleware

        add_api_key_middleware(hs.app, api_key=None, admin_api_key=None)
    # no `with TestClient(...)`: the lifespan (OpenAI serving objects, warmup thread) is not started
    return TestClient(hs.app, raise_server_exceptions=False), tm, hs


def run(spec: dict) -> list:
    client, tm, _ = build_app(spec.get("tp_size", 1), spec.get("vocab_size", 1000))
    out = []
    for call in spec["calls"]:
        n = len(tm.records)
        kwargs = {} if call.get("json") is None else {"json": call["json"]}
        r = client.request(call["method"], call["path"], **kwargs)
        try:
            reply = r.json()
        except ValueError:
            reply = r.text
        out.append({"name": call["name"], "status": r.status_code, "reply": reply, "recorded": tm.records[n:]})
    return out


def main() -> None:
    op = sys.argv[1] if len(sys.argv) > 1 else "check"
    if op == "check":
        t = time.time()
        hs = load_http_server()
        from sglang.version import __version__

        print(json.dumps({"ok": True, "sglang": __version__, "import_s": round(time.time() - t, 1),
                          "routes": len(hs.app.routes)}))
        return
    spec = json.loads(sys.stdin.read())
    if os.environ.get("RFPO_MP_AUTHKEY"):  # the parent's resource sharer (CPU tensor fds) checks it
        import multiprocessing

        multiprocessing.current_process().authkey = bytes.fromhex(os.environ["RFPO_MP_AUTHKEY"])
    with contextlib.redirect_stdout(io.StringIO()):
        answer = run(spec)
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
