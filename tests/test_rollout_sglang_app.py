"""The client's exact HTTP bodies against SGLang's own FastAPI app (issue 12, Deliver 1(d); slow).

Every body EngineClient sends to a server is produced here by the project's own code, exactly as it would go on the
wire (the client's `_http` is replaced by a recorder, so control calls keep their real order: begin_weight_update,
the updates, end_weight_update), and posted in a child process to the real `app` of sglang/srt/entrypoints/
http_server.py (pinned release, installed --no-deps in a separate CPU venv by tools/sglang_app_env.sh) through a
FastAPI TestClient. Only the tokenizer manager behind the handlers is a fake (tests/sglang_app_child.py): it records
the request object SGLang's handler built from the body and answers like an idle server. So a body is accepted
only if SGLang's routing, its /generate contract check, FastAPI's parsing into SGLang's io_struct dataclasses and
SGLang's `SamplingParams` accept it, and the recorded objects must carry what the client meant (ids, per-item
sampling settings and seeds, rids, tensor names/dtypes/shapes decoded per TP rank, tags, paths).

Needs ~2.5 GB: `make test-sglang-app` builds the venv and runs this test; without the venv it skips saying so.
"""
from __future__ import annotations

import copy
import json
import multiprocessing
import os
import subprocess
import threading

import pytest
import torch

from rfpo_megatron.rollout import weights as W
from rfpo_megatron.rollout.base import SamplingParams, derive_seed
from rfpo_megatron.rollout.client import EngineClient, parse_generate_item

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.environ.get("SGLANG_APP_VENV", os.path.join(ROOT, ".cache", "sglang-app-venv"))
CHILD = os.path.join(HERE, "sglang_app_child.py")
SGLANG_VERSION = "0.5.23"

W1, W2, ROUTER = "http://10.0.0.1:30000", "http://10.0.0.2:30000", "http://10.0.0.1:29000"
TP = 2
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25]]
FULL = SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, max_new_tokens=16,
                      stop_token_ids=[7, 9], ignore_eos=True, seed=1234)
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
NAMED = [("model.embed_tokens.weight", torch.arange(32, dtype=torch.float32).reshape(8, 4)),
         ("model.layers.0.mlp.up_proj.weight", torch.linspace(-1, 1, 24).reshape(6, 4).to(torch.bfloat16)),
         ("model.norm.weight", torch.ones(4, dtype=torch.float16))]


def _venv_python() -> str:
    py = os.path.join(VENV, "bin", "python")
    if not (os.path.isfile(os.path.join(VENV, ".rfpo_sglang_app")) and os.access(py, os.X_OK)):
        pytest.skip(f"SGLang app venv missing at {VENV}: run `make test-sglang-app` "
                    f"(bash tools/sglang_app_env.sh builds it, ~2.5 GB, then runs this test)")
    return py


class _Reply:
    def __init__(self, obj):
        self._obj = obj
        self.status_code = 200
        self.text = json.dumps(obj)

    def json(self):
        return self._obj


class _Wire:
    """Stands in for EngineClient._http: records (method, url, path, body) as the client sends them."""

    def __init__(self, server_info: dict):
        self.calls: list[tuple[str, str, str, object]] = []
        self.server_info = server_info
        self._lock = threading.Lock()

    def __call__(self, method, url, path, payload=None, timeout=None, ok_codes=(200,)):
        with self._lock:  # requests sends json.dumps(payload): the round trip is the wire body
            self.calls.append((method, url, path, None if payload is None else json.loads(json.dumps(payload))))
        return _Reply(self.server_info if path == "/get_server_info" else {"success": True, "message": "Success"})


def _client(url, workers=None, **kw) -> tuple[EngineClient, _Wire]:
    c = EngineClient(url, workers, tp_size=TP, **kw)
    wire = _Wire({"version": SGLANG_VERSION})
    c._http = wire
    return c, wire


def _control_calls(rc: EngineClient) -> None:
    """What the trainer's client does to the servers around a step (every control endpoint it uses)."""
    _ = rc.kind  # /get_server_info
    with rc.weight_update_session():
        rc.update_weights_from_tensors(NAMED, weight_version="step-1")
    rc.update_weights_from_disk("/ckpt/hf-step-2", weight_version="step-2")
    rc.init_weights_update_group("10.0.0.9", 29600, 1, 1 + TP * 2)
    with rc.weight_update_session():
        rc.update_weights_from_distributed([n for n, _ in NAMED], [W.torch_dtype_name(t.dtype) for _, t in NAMED],
                                           [list(t.shape) for _, t in NAMED], weight_version="step-3")
    rc.destroy_weights_update_group()
    rc.release_memory(rc.memory_tags)
    rc.resume_memory(rc.memory_tags)
    rc.flush_cache()
    rc.abort("r-0-1")
    rc.abort()


def _run_child(calls: list[dict]) -> list[dict]:
    py = _venv_python()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
               # CPU tensors travel as fds fetched from this process's resource sharer, which checks the
               # multiprocessing authkey: the child (SGLang's TP ranks) gets ours
               RFPO_MP_AUTHKEY=multiprocessing.current_process().authkey.hex())
    spec = {"tp_size": TP, "vocab_size": 1000, "calls": calls}
    r = subprocess.run([py, CHILD, "run"], input=json.dumps(spec), text=True, capture_output=True, timeout=600,
                       env=env, cwd=ROOT)
    assert r.returncode == 0, f"SGLang app child failed (exit {r.returncode}):\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exchange():
    """Build every body with the project's code, post them all to SGLang's app once, return both sides."""
    _venv_python()
    plain, _ = _client(W1, max_items_per_request=3)
    assert not plain.via_router
    batch = plain.build_generate_payloads(PROMPTS, FULL, rid_prefix="b")      # 3 items + 1 item
    greedy = plain.build_generate_payloads(PROMPTS, GREEDY, rid_prefix="g")   # 2 items
    rc, wire = _client(ROUTER, [W1, W2])
    assert rc.via_router
    routed = rc.build_generate_payloads(PROMPTS, FULL, rid_prefix="r")        # one body per item
    _control_calls(rc)

    calls = [{"name": "get_server_info", "method": "GET", "path": "/get_server_info", "json": None},
             {"name": "health_generate", "method": "GET", "path": "/health_generate", "json": None}]
    gen = [("batch", b, idx) for b, idx in batch] + [("greedy", b, idx) for b, idx in greedy] + \
          [("router", b, idx) for b, idx in routed]
    calls += [{"name": f"generate/{kind}/{k}", "method": "POST", "path": "/generate", "json": b}
              for k, (kind, b, _) in enumerate(gen)]
    # one app = server W1: replay the client's calls to W1 in order; W2's tensor body (its own dumps) right after W1's
    w2_tensor = [c for c in wire.calls if c[1] == W2 and c[2] == "/update_weights_from_tensor"]
    assert len(w2_tensor) == 1
    for k, (method, url, path, body) in enumerate(wire.calls):
        if url != W1 or path == "/get_server_info":
            continue
        calls.append({"name": f"{path.strip('/')}#{k}", "method": method, "path": path, "json": body})
        if path == "/update_weights_from_tensor":
            calls.append({"name": "update_weights_from_tensor[W2]", "method": "POST", "path": path,
                          "json": w2_tensor[0][3]})
    # bodies SGLang must refuse, so this test can fail
    bad_gen = copy.deepcopy(batch[0][0])
    bad_gen["sampling_params"][0]["not_an_sglang_param"] = 1
    bad_group = next(dict(c[3]) for c in wire.calls if c[2] == "/init_weights_update_group")
    del bad_group["master_address"]
    calls += [{"name": "bad/generate_unknown_sampling_key", "method": "POST", "path": "/generate", "json": bad_gen},
              {"name": "bad/init_group_without_address", "method": "POST", "path": "/init_weights_update_group",
               "json": bad_group}]
    answers = _run_child(calls)  # NAMED stays alive meanwhile: SGLang's ranks open its shared storages
    assert [a["name"] for a in answers] == [c["name"] for c in calls]
    return {"answers": {a["name"]: a for a in answers}, "gen": gen, "wire": wire.calls, "rc": rc}


def _only(answer: dict, call: str) -> dict:
    recs = [r for r in answer["recorded"] if r["call"] == call]
    assert len(recs) == 1, f"{answer['name']}: expected one {call}, SGLang's handler made {answer['recorded']}"
    return recs[0]


def _by_path(ex, path: str) -> list[dict]:
    return [a for n, a in ex["answers"].items() if n.startswith(path.strip("/") + "#") or n.startswith(path.strip("/") + "[")]


def test_every_client_body_is_accepted_by_sglang_app(exchange):
    bad = {n: (a["status"], a["reply"]) for n, a in exchange["answers"].items()
           if not n.startswith("bad/") and a["status"] != 200}
    assert not bad, f"SGLang {SGLANG_VERSION}'s app refused client bodies: {bad}"
    used = {c["path"] if isinstance(c, dict) else c[2] for c in exchange["wire"]} | {"/generate", "/health_generate"}
    assert used == {"/get_server_info", "/health_generate", "/generate", "/update_weights_from_tensor",
                    "/update_weights_from_disk", "/init_weights_update_group", "/update_weights_from_distributed",
                    "/destroy_weights_update_group", "/begin_weight_update", "/end_weight_update",
                    "/release_memory_occupation", "/resume_memory_occupation", "/flush_cache", "/abort_request"}


def test_wrong_bodies_are_refused_by_sglang_app(exchange):
    a = exchange["answers"]["bad/generate_unknown_sampling_key"]
    assert a["status"] == 400 and "unknown field `not_an_sglang_param`" in json.dumps(a["reply"]), a
    assert a["recorded"] == []
    a = exchange["answers"]["bad/init_group_without_address"]
    assert a["status"] == 400 and "master_address" in json.dumps(a["reply"]), a
    assert a["recorded"] == []


def test_server_info_and_health_answers_drive_the_client_as_sglang(exchange):
    info = exchange["answers"]["get_server_info"]["reply"]
    assert info["version"] == SGLANG_VERSION and info["tp_size"] == TP and info["enable_memory_saver"] is True
    c = EngineClient(W1, tp_size=TP)
    c._http = _Wire(info)  # SGLang's real /get_server_info reply
    assert c.kind == "sglang" and c.protocol_version[:3] == (0, 5, 23)
    assert c.needs_weight_session and "cuda_graph" in c.memory_tags
    h = exchange["answers"]["health_generate"]
    rec = _only(h, "generate_request")  # SGLang's own one-token health request reached the manager
    assert rec["is_single"] and rec["items"][0]["input_ids"] == [0]


def _expected_sampling(params: SamplingParams, i: int, j: int) -> dict:
    greedy = params.temperature == 0
    return {"n": 1, "temperature": 1.0 if greedy else params.temperature, "top_p": params.top_p,
            "top_k": 1 if greedy else params.top_k, "min_p": params.min_p, "max_new_tokens": params.max_new_tokens,
            "ignore_eos": params.ignore_eos, "skip_special_tokens": False, "no_stop_trim": True,
            "stop_token_ids": sorted(params.stop_token_ids) or None,
            "sampling_seed": None if params.seed is None else derive_seed(params.seed, i, j)}


def test_generate_bodies_become_the_intended_sglang_requests(exchange):
    seen = set()
    for k, (kind, body, index) in enumerate(exchange["gen"]):
        a = exchange["answers"][f"generate/{kind}/{k}"]
        rec = _only(a, "generate_request")
        params = GREEDY if kind == "greedy" else FULL
        assert rec["is_single"] == (kind == "router"), (kind, rec["is_single"])
        assert len(rec["items"]) == len(index)
        replies = [a["reply"]] if rec["is_single"] else a["reply"]
        assert isinstance(replies, list) and len(replies) == len(index)
        for item, (i, j), reply in zip(rec["items"], index, replies):
            prefix = {"batch": "b", "greedy": "g", "router": "r"}[kind]
            assert item["rid"] == f"{prefix}-{i}-{j}" and item["input_ids"] == PROMPTS[i]
            assert item["return_logprob"] is True and item["logprob_start_len"] == -1 and not item["stream"]
            sp = item["sampling_params"]  # SGLang's SamplingParams after normalize()/verify()
            got = {key: sp[key] for key in _expected_sampling(params, i, j)}
            assert got == _expected_sampling(params, i, j), (kind, i, j, got)
            res = parse_generate_item(reply)  # SGLang's JSON reply, read back by the client's own parser
            assert res.output_ids and len(res.logprobs) == len(res.output_ids) and res.meta["id"] == item["rid"]
            seen.add((kind, i, j))
    assert len(seen) == 2 * 2 + 2 * 1 + 2 * 2


def test_weight_tensor_payloads_decode_on_every_rank_of_every_server(exchange):
    answers = _by_path(exchange, "/update_weights_from_tensor")
    assert len(answers) == 2  # W1's and W2's body, each inside the client's weight-update session
    for a in answers:
        rec = _only(a, "update_weights_from_tensor")
        assert rec["entries"] == TP  # one separate dump per TP rank
        assert rec["obj"]["load_format"] is None and rec["obj"]["flush_cache"] is True
        assert rec["obj"]["weight_version"] == "step-1"
        assert len(rec["ranks"]) == TP
        for rank in rec["ranks"]:
            assert "error" not in rank, rank
            assert rank["names"] == [n for n, _ in NAMED]
            assert rank["dtypes"] == [str(t.dtype) for _, t in NAMED]
            assert rank["shapes"] == [list(t.shape) for _, t in NAMED]
            assert rank["sums"] == pytest.approx([float(t.double().sum()) for _, t in NAMED])


def test_control_bodies_become_the_intended_sglang_requests(exchange):
    order = [n.split("#")[0] for n in exchange["answers"] if "#" in n]
    assert order == ["begin_weight_update", "update_weights_from_tensor", "end_weight_update",
                     "update_weights_from_disk", "init_weights_update_group", "begin_weight_update",
                     "update_weights_from_distributed", "end_weight_update", "destroy_weights_update_group",
                     "release_memory_occupation", "resume_memory_occupation", "flush_cache", "abort_request",
                     "abort_request"]
    for a in _by_path(exchange, "/begin_weight_update") + _by_path(exchange, "/end_weight_update"):
        assert a["reply"]["success"] is True, a
    disk = _only(_by_path(exchange, "/update_weights_from_disk")[0], "update_weights_from_disk")["obj"]
    assert disk["model_path"] == "/ckpt/hf-step-2" and disk["weight_version"] == "step-2"
    group = _only(_by_path(exchange, "/init_weights_update_group")[0], "init_weights_update_group")["obj"]
    assert {k: group[k] for k in ("master_address", "master_port", "rank_offset", "world_size", "group_name",
                                  "backend")} == {"master_address": "10.0.0.9", "master_port": 29600, "rank_offset": 1,
                                                  "world_size": 1 + TP * 2, "group_name": "weight_update_group",
                                                  "backend": "nccl"}
    dist = _only(_by_path(exchange, "/update_weights_from_distributed")[0], "update_weights_from_distributed")["obj"]
    assert dist["names"] == [n for n, _ in NAMED] and dist["shapes"] == [list(t.shape) for _, t in NAMED]
    assert dist["dtypes"] == ["float32", "bfloat16", "float16"] and dist["weight_version"] == "step-3"
    assert dist["group_name"] == "weight_update_group" and dist["flush_cache"] is True
    destroy = _only(_by_path(exchange, "/destroy_weights_update_group")[0], "destroy_weights_update_group")["obj"]
    assert destroy["group_name"] == "weight_update_group"
    tags = exchange["rc"].memory_tags
    assert tags == ["weights", "kv_cache", "cuda_graph"]
    for path, call in (("/release_memory_occupation", "release_memory_occupation"),
                       ("/resume_memory_occupation", "resume_memory_occupation")):
        assert _only(_by_path(exchange, path)[0], call)["obj"]["tags"] == tags
    assert _only(_by_path(exchange, "/flush_cache")[0], "flush_cache")
    aborts = [_only(a, "abort_request") for a in _by_path(exchange, "/abort_request")]
    assert [(r["rid"], r["abort_all"]) for r in aborts] == [("r-0-1", False), ("", True)]
