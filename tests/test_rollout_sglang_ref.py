"""The rollout client against SGLang's own code: the /generate schema, the tensor-payload decoder and the
launch-line parsers of the pinned SGLang release (tests/sglang_ref.py), and the installed sglang-router CLI.

Every body, payload and command line is built by the project's own code, exactly as a run builds it, and
judged by SGLang's code in a child process (cheap: a few seconds per test)."""
from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import sglang_ref as R  # noqa: E402

from rfpo_megatron.config import load_config  # noqa: E402
from rfpo_megatron.rollout import EngineClient, SamplingParams  # noqa: E402
from rfpo_megatron.rollout import weights as W  # noqa: E402
from rfpo_megatron.rollout.sglang import build_router_cmd, build_server_cmd  # noqa: E402
from rfpo_megatron.train.generation import sampling_params  # noqa: E402
from rfpo_megatron.train.lifecycle import sglang_server_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*", "config*.yaml")))
GPU_EXAMPLES = [p for p in EXAMPLES if load_config(p).rollout.engine == "sglang"]


@pytest.fixture(scope="module", autouse=True)
def _sglang_copy():
    missing = R.available()
    assert missing is None, missing


def _params_of(cfg) -> list[SamplingParams]:
    """Every SamplingParams a run of cfg builds: rollout (seeded or not), fix stage, ReMax greedy, eval."""
    f, r = cfg.rfpo.fix, cfg.rollout
    out = [sampling_params(cfg, r.n_samples, None, [2]), sampling_params(cfg, r.n_samples, 1234, [2, 7]),
           sampling_params(cfg, f.attempts, 99, [2], temperature=f.temperature, max_new_tokens=f.max_new_tokens),
           sampling_params(cfg, 1, 5, [2], temperature=0.0),
           SamplingParams(n=cfg.trainer.eval_n_samples, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens, stop_token_ids=[2], seed=2**40)]
    return out


EXTRA_PARAMS = [SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, max_new_tokens=17,
                               stop_token_ids=[], ignore_eos=True, seed=2**62),
                SamplingParams(n=1, temperature=1.3, top_k=-1, max_new_tokens=0)]


def test_every_generate_body_validates_with_sglang_schema():
    """(a) batch bodies (to a server) and one-item bodies (through sglang_router) for every sampling option
    of every shipped config are accepted by SGLang's GenerateRequest; the router form has the shape the
    router takes (one sampling_params dict, a string rid: router 0.3.2 answers 422 to lists)."""
    direct = EngineClient("http://server:1", max_items_per_request=5)
    routed = EngineClient("http://router:9", ["http://server:1", "http://server:2"])
    assert not direct.via_router and routed.via_router
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    bodies, router_bodies = [], []
    for params in [p for path in EXAMPLES for p in _params_of(load_config(path))] + EXTRA_PARAMS:
        bodies += [b for b, _ in direct.build_generate_payloads(prompts, params)]
        router_bodies += [b for b, _ in routed.build_generate_payloads(prompts, params)]
    for b in router_bodies:
        assert isinstance(b["sampling_params"], dict) and isinstance(b["rid"], str)
        assert isinstance(b["input_ids"][0], int)
    assert all(isinstance(b["sampling_params"], list) and isinstance(b["rid"], list) for b in bodies)
    errors = R.run("generate_requests", bodies=bodies + router_bodies)
    bad = [(b, e) for b, e in zip(bodies + router_bodies, errors) if e is not None]
    assert not bad, bad[:3]
    # the schema is strict where SGLang is: an unknown sampling key, a list rid of the wrong type
    wrong = [{"input_ids": [1], "sampling_params": {"n": 1, "best_of": 2}}, {"input_ids": [1], "rid": 7}]
    assert all(e is not None for e in R.run("generate_requests", bodies=wrong))


def test_embedded_replies_validate_with_sglang_response_schema(tmp_path):
    """(a) what the embedded server answers (logprobs or not; stop, length and abort finishes) is a valid
    SGLang GenerateResponse, and the client parses it back."""
    from rfpo_megatron.rollout.client import parse_generate_item
    from rfpo_megatron.rollout.embedded import EmbeddedEngine, GenItem
    from tiny_hf import make_tiny_hf_model

    eng = EmbeddedEngine(str(make_tiny_hf_model(tmp_path / "m", seed=3)))
    items = [GenItem(rid="a", input_ids=[1, 2], max_new_tokens=4, ignore_eos=True, return_logprob=True, seed=1),
             GenItem(rid="b", input_ids=[3], max_new_tokens=6, temperature=0.0, return_logprob=False),
             GenItem(rid="c", input_ids=[4, 5], max_new_tokens=8, stop_token_ids=list(range(300)), seed=2,
                     return_logprob=True)]
    replies = eng.generate(items)
    eng.abort(abort_all=True)
    replies += eng.generate([GenItem(rid="d", input_ids=[1], max_new_tokens=5, ignore_eos=True)])
    assert [r["meta_info"]["finish_reason"]["type"] for r in replies] == ["length", "length", "stop", "length"] or \
        replies[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert R.run("generate_responses", replies=replies) == [None] * len(replies)
    for r, it in zip(replies, items):
        res = parse_generate_item(r)
        assert res.output_ids == r["output_ids"] and len(res.logprobs) == (len(res.output_ids) if it.return_logprob else 0)
    broken = dict(replies[0], meta_info=dict(replies[0]["meta_info"], output_token_logprobs=[{"lp": 0.1}]))
    assert R.run("generate_responses", replies=[broken])[0] is not None


def _named():
    g = torch.Generator().manual_seed(0)
    return [("model.embed_tokens.weight", torch.randn(7, 4, generator=g)),
            ("lm_head.weight", torch.randn(3, 4, generator=g).bfloat16()),
            ("model.layers.0.self_attn.q_proj.weight", torch.randn(4, 6, generator=g).t()),  # non-contiguous view
            ("model.norm.weight", torch.nn.Parameter(torch.rand(4, generator=g)))]


def _expect(named):
    return {"names": [n for n, _ in named], "shapes": [list(t.shape) for _, t in named],
            "dtypes": [str(t.dtype) for _, t in named], "sums": [float(t.detach().double().sum()) for _, t in named]}


def test_every_tensor_payload_entry_decodes_with_sglang_serializer():
    """(b) each server x each TP rank decodes its own entry with SGLang's MultiprocessingSerializer (after its
    monkey_patch_torch_reductions, as the TP workers do) into the sent tensors — for rank 0's client and for
    the client a later pipeline stage's sender builds from rank 0's spec (train.weight_sync.share_engine)."""
    named = _named()
    rank0 = EngineClient("http://router:9", ["http://a:1", "http://b:1"], tp_size=2)
    stage1 = EngineClient.from_spec(rank0.spec())
    assert stage1.tp_size == 2 and stage1.via_router and stage1.worker_urls == rank0.worker_urls
    entries = []
    for client in (rank0, stage1):
        payloads = client.tensor_payloads(named, kind="sglang")
        assert len(payloads) == 2 and all(len(p["serialized_named_tensors"]) == 2 for p in payloads)
        assert all(p["load_format"] is None and p["flush_cache"] is True for p in payloads)
        entries += [e for p in payloads for e in p["serialized_named_tensors"]]
    want = _expect(named)
    for k, got in enumerate(R.run("decode", entries=entries)):
        assert got.get("error") is None, f"entry {k} (client {k // 4}, server {k // 2 % 2}, rank {k % 2}): {got}"
        assert {k: got[k] for k in ("names", "shapes", "dtypes")} == {k: want[k] for k in ("names", "shapes", "dtypes")}
        assert got["sums"] == pytest.approx(want["sums"], rel=1e-6, abs=1e-6)
    assert len(set(entries)) == len(entries) == 8  # a separate dump per server and rank


def test_one_dump_copied_to_every_rank_breaks_the_second_rank():
    """Why every rank needs its own dump: the shared-memory handles of one dump are opened once, so the
    payload the client used to send ([dump] * tp_size) fails for TP rank 1 in SGLang's decoder."""
    copied = W.encode_sglang_named_tensors(_named(), tp_size=1) * 2
    first, second = R.run("decode", entries=copied)
    assert first.get("error") is None and second.get("error"), (first, second)
    assert "EOFError" in second["error"] or "Error" in second["error"]


def test_cuda_devices_are_recorded_by_uuid_like_sglang():
    """A CUDA tensor's device travels as the GPU UUID at the argument SGLang's patched rebuild reads."""
    from torch.multiprocessing import reductions

    assert W.CUDA_DEVICE_ARG == R.run("patch_constants")["device_arg"]
    args = tuple(range(15))
    fn, out = W.with_device_uuid(reductions.rebuild_cuda_tensor, args, uuid_of=lambda i: f"GPU-uuid-{i}")
    assert out[W.CUDA_DEVICE_ARG] == "GPU-uuid-6" and out[:6] == args[:6] and out[7:] == args[7:]
    assert W.with_device_uuid(reductions.rebuild_tensor, args)[1] == args  # CPU tensors untouched
    assert W.with_device_uuid(reductions.rebuild_cuda_tensor, out)[1] == out  # already a UUID


def _after(cmd: list[str], module: str) -> list[str]:
    return cmd[cmd.index(module) + 1:]


@pytest.mark.parametrize("path", GPU_EXAMPLES, ids=lambda p: os.path.relpath(p, ROOT))
def test_trainer_launched_server_lines_parse_with_sglang_server_args(path):
    """(c) the server line the trainer builds for a recipe (rollout.engine=sglang) parses with SGLang's
    ServerArgs (no abbreviations) and carries tp size, mem_fraction_static and the memory saver."""
    cfg = load_config(path)
    det = load_config(path, ["rollout.deterministic_inference=true", "rollout.return_routed_experts=true"])
    lines = [build_server_cmd("/models/m", "127.0.0.1", 30001, c.rollout.sglang_tp, sglang_server_args(c))
             for c in (cfg, det)]
    got = R.run("server_args", argvs=[_after(c, "sglang.launch_server") for c in lines])
    for g, c in zip(got, (cfg, det)):
        assert g.get("error") is None, g
        assert g["tp_size"] == c.rollout.sglang_tp and g["mem_fraction_static"] == c.rollout.mem_fraction_static
        assert g["enable_memory_saver"] is bool(c.rollout.colocate) and g["port"] == 30001
    assert got[0]["enable_deterministic_inference"] is False and got[1]["enable_deterministic_inference"] is True
    # R3: the flag follows rollout.return_routed_experts (implied by actor.router_replay=rollout, the MoE recipes')
    wants_routing = cfg.rollout.return_routed_experts or cfg.actor.router_replay == "rollout"
    assert got[0]["enable_return_routed_experts"] is wants_routing and got[1]["enable_return_routed_experts"] is True
    # the abbreviation the sbatch script used to pass is not the flag (argparse abbreviations break silently)
    assert "error" in R.run("server_args", argvs=[["--model-path", "/m", "--tp", "2"]])[0]


def test_router_line_parses_with_the_router_cli():
    """(c) the router line: loopback Prometheus on its own port, a health check that never generates, no retries."""
    cmd = build_router_cmd(["http://127.0.0.1:1", "http://127.0.0.1:2"], "127.0.0.1", 30010, {"policy": "round_robin"},
                           request_timeout_s=600)
    got = R.run("router_args", argvs=[_after(cmd, "sglang_router.launch_router")])[0]
    assert got.get("error") is None, got
    assert got["worker_urls"] == ["http://127.0.0.1:1", "http://127.0.0.1:2"] and got["port"] == 30010
    assert got["prometheus_host"] == "127.0.0.1" and got["prometheus_port"] not in (None, 29000)
    assert got["health_check_endpoint"] == "/get_model_info" and got["disable_retries"] is True
    assert got["request_timeout_secs"] == 600


RECORDER = r'''#!{python}
import json, os, subprocess, sys
if len(sys.argv) > 1 and sys.argv[1].endswith("helpers.py"):
    if sys.argv[2] == "get":
        sys.exit(subprocess.call([{python!r}] + sys.argv[1:]))
    sys.exit(0)  # wait-http: the servers are not really started
with open(os.environ["RFPO_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
'''
FAKE_SRUN = r'''#!/bin/bash
# run what srun would run on the node: everything from the first "bash" or python word on
while [ $# -gt 0 ] && [ "$1" != bash ] && [ "$1" != "$RFPO_PYTHON" ]; do shift; done
exec "$@"
'''


@pytest.mark.parametrize("path", GPU_EXAMPLES, ids=lambda p: os.path.relpath(p, ROOT))
def test_sbatch_server_and_router_lines_parse(path, tmp_path):
    """(c) slurm/common.sh's rfpo_start_sglang run for real (srun and the interpreter recorded, not executed)
    on two nodes: every server line parses with ServerArgs and carries the recipe's tp size, mem fraction and
    the colocated memory saver; the router line parses with the router CLI and has a Prometheus port of its own."""
    cfg = load_config(path)
    rec, bin_dir = tmp_path / "record.jsonl", tmp_path / "bin"
    bin_dir.mkdir()
    python = tmp_path / "python"
    python.write_text(RECORDER.format(python=sys.executable))
    (bin_dir / "srun").write_text(FAKE_SRUN)
    for f in (python, bin_dir / "srun"):
        f.chmod(0o755)
    extra = "--enable-memory-saver" if cfg.rollout.colocate else ""
    script = (f"source slurm/common.sh; RFPO_NODES=$'node1\\nnode2'; MASTER_PORT=20000; "
              f"rfpo_start_sglang 0 2 8 {cfg.rollout.mem_fraction_static} {shlex.quote(extra)}; wait")
    env = dict(os.environ, RFPO_CONFIG=path, RFPO_PYTHON=str(python), RFPO_RECORD=str(rec), RFPO_REPO=ROOT,
               RFPO_RUN_DIR=str(tmp_path / "run"), PATH=f"{bin_dir}:{os.environ['PATH']}",
               RFPO_OVERRIDES="rollout.deterministic_inference=true rollout.return_routed_experts=true")
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    servers = [_after(a, "sglang.launch_server") for a in lines if "sglang.launch_server" in a]
    routers = [_after(a, "sglang_router.launch_router") for a in lines if "sglang_router.launch_router" in a]
    assert len(servers) == 2 * (8 // cfg.rollout.sglang_tp) and len(routers) == 1
    for g in R.run("server_args", argvs=servers):
        assert g.get("error") is None, g
        assert g["tp_size"] == cfg.rollout.sglang_tp and g["mem_fraction_static"] == cfg.rollout.mem_fraction_static
        assert g["enable_memory_saver"] is bool(cfg.rollout.colocate) and g["enable_deterministic_inference"] is True
        assert g["enable_return_routed_experts"] is True  # R3 routing asked for by the override
    r = R.run("router_args", argvs=routers)[0]
    assert r.get("error") is None, r
    assert len(r["worker_urls"]) == len(servers) and r["prometheus_port"] not in (None, 29000)
    assert r["health_check_endpoint"] == "/get_model_info" and r["disable_retries"] is True
