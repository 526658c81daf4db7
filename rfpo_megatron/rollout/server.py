"""`rfpo-megatron serve`: the embedded engine behind SGLang's HTTP endpoints (the subset the trainer uses).

Endpoints (same paths, fields and answers as SGLang 0.5.23's http_server.py; embedded.SGLANG_COMPAT):
  GET  /health, /health_generate          200 after a one-token generation when idle (as SGLang); 503 when the
                                          memory is released (SGLang would generate on released memory)
  GET  /get_server_info, /get_model_info  JSON; get_server_info has "version", "sglang_compat" and
                                          "engine": "rfpo-embedded"
  POST /generate                          GenerateRequest subset: input_ids, sampling_params, rid, return_logprob,
                                          return_routed_experts, routed_experts_start_len (MoE, R3);
                                          unknown top-level fields are ignored (the router adds some), unknown
                                          sampling_params keys are refused — both as SGLang
  GET|POST /flush_cache                   400 while requests run (SGLang flushes only an idle server)
  POST /begin_weight_update, /end_weight_update   the weight-update session (SGLang >= 0.5.21)
  POST /update_weights_from_tensor        serialized_named_tensors (load_format "rfpo_safetensors_b64"), flush_cache
  POST /update_weights_from_disk          model_path, load_format
  POST /init_weights_update_group         master_address, master_port, rank_offset, world_size, group_name, backend
  POST /update_weights_from_distributed   names, dtypes, shapes, group_name, flush_cache
  POST /destroy_weights_update_group      group_name
  GET|POST /release_memory_occupation, /resume_memory_occupation   tags (none = weights, kv_cache, cuda_graph)
  POST /abort_request                     rid, abort_all
  POST /pause_generation, /continue_generation   mode ("abort" only); running requests return what they have
  POST /shutdown                          (embedded only) stop the server
Malformed requests get HTTP 400 with {"object": "error", "message": ..., "code": 400}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from .embedded import SGLANG_COMPAT, EmbeddedEngine, GenItem, RequestError, new_rid, parse_sampling_params

ENGINE_NAME = "rfpo-embedded"

# GenerateRequest fields that must keep their default value here (other unknown fields are ignored, as SGLang's
# GenerateRequest does: "unknown keys ignored"; sglang_router adds model, return_bytes, return_entropy).
_GEN_DEFAULT_ONLY = {"text", "input_embeds", "image_data", "video_data", "audio_data", "lora_path",
                     "custom_logit_processor", "session_params", "token_ids_logprob", "return_hidden_states"}


def parse_generate_request(body: Any, vocab_size: int) -> tuple[list[GenItem], bool]:
    """SGLang /generate JSON -> (items, is_single). n > 1 is expanded prompt-major like SGLang."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    for key in _GEN_DEFAULT_ONLY:
        if body.get(key):
            raise RequestError(f"/generate field '{key}' is not supported by the embedded engine (send input_ids)")
    if body.get("stream"):
        raise RequestError("stream=true is not supported by the embedded engine")
    if body.get("top_logprobs_num"):
        raise RequestError("top_logprobs_num > 0 is not supported by the embedded engine")
    if body.get("logprob_start_len") not in (None, -1):
        raise RequestError("logprob_start_len other than -1 (output tokens only) is not supported")
    ids = body.get("input_ids")
    if ids is None:
        raise RequestError("input_ids is required (the embedded engine takes token ids, not text)")
    if not isinstance(ids, list) or not ids:
        raise RequestError("input_ids must be a non-empty list of ints or a list of such lists")
    single = not isinstance(ids[0], list)
    prompts = [ids] if single else ids
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise RequestError(f"input_ids[{i}] must be a list of ints")
    B = len(prompts)

    def per_item(key: str, value: Any, kind) -> list:
        if isinstance(value, list) and not single:
            if len(value) != B:
                raise RequestError(f"{key} has {len(value)} entries for {B} prompts")
            return value
        if isinstance(value, list) and single and kind is not list:
            raise RequestError(f"{key} must not be a list for a single prompt")
        return [value] * B

    sps = per_item("sampling_params", body.get("sampling_params"), dict)
    rids = body.get("rid")
    if rids is not None:
        rids = per_item("rid", rids, str)
        if not single and not isinstance(body.get("rid"), list):
            rids = [f"{body['rid']}-{i}" for i in range(B)]
        if any(not isinstance(r, str) for r in rids):
            raise RequestError("rid must be a string (or a list of strings for a batch)")
        if len(set(rids)) != len(rids):
            raise RequestError("duplicate rids in one request")
    rlp = per_item("return_logprob", body.get("return_logprob"), bool)
    rre = body.get("return_routed_experts") or False  # one bool per request, as SGLang's GenerateReqInput
    rre_start = body.get("routed_experts_start_len") or 0
    if not isinstance(rre, bool) or isinstance(rre_start, bool) or not isinstance(rre_start, int):
        raise RequestError("return_routed_experts must be a bool and routed_experts_start_len an int")
    items: list[GenItem] = []
    for i, p in enumerate(prompts):
        sp = parse_sampling_params(sps[i], vocab_size)
        n = sp.pop("n")
        for j in range(n):
            rid = rids[i] if (rids is not None and n == 1) else new_rid()
            items.append(GenItem(rid=rid, input_ids=list(p), return_logprob=bool(rlp[i]), return_routed_experts=rre,
                                 routed_experts_start_len=rre_start, **sp))
    return items, single and len(items) == 1


class _Handler(BaseHTTPRequestHandler):
    server_version = "rfpo-embedded"
    # keep-alive (every reply has a Content-Length): a client's session reuses one connection and handler thread
    # instead of a TCP connect and a new thread per call; model work runs on the engine's one torch thread
    # (EmbeddedEngine._on_torch_thread), never on these threads
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # TCP_NODELAY: headers and body go out at once (no 40 ms delayed-ACK stall)
    routes: dict[tuple[str, str], Callable] = {}

    def log_message(self, fmt, *args):  # quiet access log; errors are logged explicitly
        pass

    def _reply(self, status: int, payload: Any = None, text: str | None = None) -> None:
        data = text.encode() if text is not None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if text is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _error(self, status: int, message: str) -> None:
        phrase = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error", 503: "Service Unavailable"}
        self._reply(status, {"object": "error", "message": message, "type": phrase.get(status, str(status)),
                             "param": None, "code": status})

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise RequestError(f"request body is not valid JSON: {e}") from None

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        fn = self.routes.get((method, path))
        if fn is None:
            if any(p == path for _, p in self.routes):
                self._error(405, f"{method} is not allowed on {path}")
            else:
                self._error(404, f"no endpoint {path} on the embedded engine")
            return
        try:
            body = self._body() if method in ("POST", "PUT") else {}
            fn(self, body)
        except RequestError as e:
            self._error(400, str(e))
        except Exception as e:  # a server bug: answer 500 and log the stack
            traceback.print_exc()
            self._error(500, f"{type(e).__name__}: {e}")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")


def _route(methods: str, path: str):
    def deco(fn):
        for m in methods.split("|"):
            _Handler.routes[(m, path)] = fn
        return fn
    return deco


def _engine(h: _Handler) -> EmbeddedEngine:
    return h.server.engine  # type: ignore[attr-defined]


def _dict_body(body: Any) -> dict:
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    return body


def _require(body: dict, key: str, kind):
    if key not in body or body[key] is None:
        raise RequestError(f"field '{key}' is required")
    v = body[key]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise RequestError(f"field '{key}' must be an integer, got {v!r}")
    if kind is not int and not isinstance(v, kind):
        raise RequestError(f"field '{key}' must be {kind.__name__}, got {type(v).__name__}")
    return v


@_route("GET|POST", "/health")
@_route("GET|POST", "/health_generate")
def _health(h: _Handler, body: Any) -> None:
    eng = _engine(h)
    if eng.paused:  # a health generation would wait for /continue_generation
        return h._reply(200, text="")
    if eng.released:  # SGLang would run its one-token check on released memory: count it, answer 503
        eng.health_while_released += 1
        print(f"[rfpo-embedded] health check while memory {sorted(eng.released)} is released "
              f"(SGLang would generate on released memory)", flush=True)
        return h._reply(503, text="memory released")
    if eng.lock.acquire(blocking=False):
        eng.lock.release()
        eng.health_generations += 1
        eng.generate([GenItem(rid="HEALTH_CHECK_" + new_rid(), input_ids=[0], max_new_tokens=1, temperature=0.0)])
        return h._reply(200, text="")
    if time.time() - eng.last_progress < h.server.health_stall_s:  # type: ignore[attr-defined]
        return h._reply(200, text="")
    return h._reply(503, text="engine busy without progress")


@_route("GET", "/get_server_info")
def _server_info(h: _Handler, body: Any) -> None:
    from rfpo_megatron import __version__

    eng = _engine(h)
    h._reply(200, {
        "engine": ENGINE_NAME, "version": __version__, "sglang_compat": SGLANG_COMPAT, "model_path": eng.model_path,
        "tp_size": 1, "dp_size": 1, "allow_auto_truncate": eng.allow_auto_truncate,
        "weight_update_session": eng.weight_session, "health_generations": eng.health_generations,
        "health_while_released": eng.health_while_released,
        "dtype": str(eng.dtype).removeprefix("torch."), "vocab_size": eng.vocab_size, "context_length": eng.max_context,
        "max_batch_size": eng.max_batch_size, "return_original_logprob": eng.return_original_logprob,
        "weight_version": eng.weight_version, "progress": eng.progress, "last_progress_time": eng.last_progress,
        "busy": eng.busy, "released": sorted(eng.released), "eos_token_ids": eng.eos_ids,
        "weight_update_load_format": "rfpo_safetensors_b64", "internal_states": [],
    })


@_route("GET", "/get_model_info")
def _model_info(h: _Handler, body: Any) -> None:
    eng = _engine(h)
    h._reply(200, {"model_path": eng.model_path, "tokenizer_path": eng.model_path, "is_generation": True,
                   "weight_version": eng.weight_version})


@_route("GET", "/get_weight_version")
def _weight_version(h: _Handler, body: Any) -> None:
    h._reply(200, {"weight_version": _engine(h).weight_version})


@_route("POST|PUT", "/generate")
def _generate(h: _Handler, body: Any) -> None:
    eng = _engine(h)
    items, single = parse_generate_request(body, eng.vocab_size)
    outs = eng.generate(items)
    h._reply(200, outs[0] if single else outs)


@_route("GET|POST", "/flush_cache")
def _flush(h: _Handler, body: Any) -> None:
    _engine(h).flush_cache()
    h._reply(200, text="Cache flushed.\n")


@_route("POST", "/begin_weight_update")
def _begin_update(h: _Handler, body: Any) -> None:
    _engine(h).begin_weight_update()
    h._reply(200, {"success": True, "message": "Success"})


@_route("POST", "/end_weight_update")
def _end_update(h: _Handler, body: Any) -> None:
    _engine(h).end_weight_update()
    h._reply(200, {"success": True, "message": "Success"})


def _weight_reply(h: _Handler, body: dict, fn: Callable[[], int], what: str) -> None:
    n = fn()
    eng = _engine(h)
    msg = f"Succeeded to update model weights ({n} tensors, {what})."
    if body.get("weight_version") is not None:
        eng.weight_version = str(body["weight_version"])
        msg += f" Weight version updated to {eng.weight_version}."
    h._reply(200, {"success": True, "message": msg})


@_route("POST", "/update_weights_from_tensor")
def _update_tensor(h: _Handler, body: Any) -> None:
    body = _dict_body(body)
    ser = _require(body, "serialized_named_tensors", list)
    _weight_reply(h, body, lambda: _engine(h).update_weights_from_tensor(ser, body.get("load_format")), "tensor")


@_route("POST", "/update_weights_from_disk")
def _update_disk(h: _Handler, body: Any) -> None:
    body = _dict_body(body)
    path = _require(body, "model_path", str)
    if body.get("load_format") not in (None, "auto", "safetensors"):
        raise RequestError(f"load_format={body['load_format']!r} not supported (use 'auto' or 'safetensors')")
    eng = _engine(h)
    if body.get("flush_cache", True):  # SGLang flushes after loading; that fails while requests run
        eng.flush_cache()
    n = eng.update_weights_from_disk(path)
    eng.model_path = path
    msg = f"Succeeded to update model weights ({n} tensors, disk)."
    if body.get("weight_version") is not None:
        eng.weight_version = str(body["weight_version"])
        msg += f" Weight version updated to {eng.weight_version}."
    h._reply(200, {"success": True, "message": msg, "num_paused_requests": 0})


@_route("POST", "/init_weights_update_group")
def _init_group(h: _Handler, body: Any) -> None:
    body = _dict_body(body)
    _engine(h).init_weights_update_group(
        _require(body, "master_address", str), _require(body, "master_port", int), _require(body, "rank_offset", int),
        _require(body, "world_size", int), body.get("group_name") or "weight_update_group", body.get("backend") or "nccl")
    h._reply(200, {"success": True, "message": "Succeeded to initialize custom process group."})


@_route("POST", "/update_weights_from_distributed")
def _update_dist(h: _Handler, body: Any) -> None:
    body = _dict_body(body)
    names, dtypes, shapes = (_require(body, k, list) for k in ("names", "dtypes", "shapes"))
    group = body.get("group_name") or "weight_update_group"
    _weight_reply(h, body, lambda: _engine(h).update_weights_from_distributed(names, dtypes, shapes, group), "distributed")


@_route("POST", "/destroy_weights_update_group")
def _destroy_group(h: _Handler, body: Any) -> None:
    body = _dict_body(body)
    _engine(h).destroy_weights_update_group(body.get("group_name") or "weight_update_group")
    h._reply(200, {"success": True, "message": "Succeeded to destroy custom process group."})


def _tags(body: Any) -> list[str] | None:
    tags = body.get("tags") if isinstance(body, dict) else None
    if tags is not None and (not isinstance(tags, list) or not set(tags) <= {"weights", "kv_cache", "cuda_graph"}):
        raise RequestError(f"tags must be a list drawn from ['weights', 'kv_cache', 'cuda_graph'], got {tags!r}")
    return tags


@_route("GET|POST", "/release_memory_occupation")
def _release(h: _Handler, body: Any) -> None:
    _engine(h).release_memory(_tags(body))
    h._reply(200, None)


@_route("GET|POST", "/resume_memory_occupation")
def _resume(h: _Handler, body: Any) -> None:
    _engine(h).resume_memory(_tags(body))
    h._reply(200, None)


@_route("POST", "/abort_request")
def _abort(h: _Handler, body: Any) -> None:
    body = _dict_body(body)
    rid = body.get("rid") or ""
    if not isinstance(rid, str):
        raise RequestError("rid must be a string")
    _engine(h).abort(rid=rid, abort_all=bool(body.get("abort_all")))
    h._reply(200, text="")


@_route("POST", "/pause_generation")
def _pause(h: _Handler, body: Any) -> None:
    _engine(h).pause_generation(str(_dict_body(body).get("mode") or "abort"))
    h._reply(200, {"message": "Generation paused successfully.", "status": "ok"})


@_route("POST", "/continue_generation")
def _continue(h: _Handler, body: Any) -> None:
    _engine(h).continue_generation()
    h._reply(200, {"message": "Generation continued successfully.", "status": "ok"})


@_route("POST", "/shutdown")
def _shutdown(h: _Handler, body: Any) -> None:
    h._reply(200, {"success": True, "message": "shutting down"})
    threading.Thread(target=h.server.shutdown, daemon=True).start()


def make_server(engine: EmbeddedEngine, host: str = "127.0.0.1", port: int = 0,
                health_stall_s: float = 300.0) -> ThreadingHTTPServer:
    """Bind the HTTP server (port 0 = any free port; read it back from server.server_address)."""
    srv = ThreadingHTTPServer((host, port), _Handler)
    srv.daemon_threads = True
    srv.engine = engine  # type: ignore[attr-defined]
    srv.health_stall_s = health_stall_s  # type: ignore[attr-defined]
    return srv


def _watch_parent(pid: int) -> None:
    """Exit when the launching process is gone (belt and braces next to the launcher's cleanup)."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"[rfpo-embedded] parent pid {pid} is gone; exiting", flush=True)
            os._exit(0)
        except PermissionError:
            pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rfpo-megatron serve", description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000, help="0 = pick a free port (printed at startup)")
    p.add_argument("--dtype", default="float32", help="torch dtype of the served model")
    p.add_argument("--attn-implementation", default="eager", help="HF attention implementation (eager|sdpa)")
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1, ...)")
    p.add_argument("--max-batch-size", type=int, default=64, help="samples decoded together")
    p.add_argument("--return-original-logprob", action="store_true",
                   default=os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true"),
                   help="report log softmax(logits) instead of log softmax(logits / T) (SGLang env of the same name)")
    p.add_argument("--enable-weights-cpu-backup", action="store_true", help="keep weights across release/resume")
    p.add_argument("--log-every-s", type=float, default=2.0, help="progress log interval while decoding")
    p.add_argument("--health-stall-s", type=float, default=300.0, help="/health_generate fails after this long busy without progress")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1), help="torch CPU threads")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--tp-size", type=int, default=1, help="accepted for SGLang command-line compatibility; must be 1")
    p.add_argument("--enable-return-routed-experts", action="store_true",
                   help="MoE models: answer return_routed_experts requests with meta_info.routed_experts (SGLang flag)")
    p.add_argument("--no-lean-decode", dest="lean_decode", action="store_false",
                   help="decode through HF's forward instead of rollout.lean_decode (same arithmetic, slower)")
    p.add_argument("--allow-auto-truncate", action="store_true",
                   help="clip max_new_tokens to the context instead of failing the request (SGLang flag of the same name)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tp_size != 1:
        print(f"rfpo-megatron serve: --tp-size {args.tp_size}: the embedded engine runs one process (use 1)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, args.threads))
    try:
        engine = EmbeddedEngine(args.model_path, dtype=args.dtype, attn_implementation=args.attn_implementation,
                                max_batch_size=args.max_batch_size, return_original_logprob=args.return_original_logprob,
                                weights_cpu_backup=args.enable_weights_cpu_backup, log_every_s=args.log_every_s,
                                device=args.device, allow_auto_truncate=args.allow_auto_truncate,
                                enable_return_routed_experts=args.enable_return_routed_experts,
                                lean_decode=args.lean_decode)
    except (FileNotFoundError, ValueError) as e:
        print(f"rfpo-megatron serve: {e}", file=sys.stderr)
        return 2
    srv = make_server(engine, args.host, args.port, args.health_stall_s)
    host, port = srv.server_address[:2]
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    print(f"[rfpo-embedded] serving {args.model_path} on http://{host}:{port} (pid {os.getpid()}; decode path: "
          f"{engine.decode_path})", flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
