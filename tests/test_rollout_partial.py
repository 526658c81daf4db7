"""Partial rollout over real loopback HTTP with an embedded engine process: generations interrupted by weight
updates (/pause_generation -> update with a weight_version -> /continue_generation) are resumed with the new
weights; every token's log-prob equals an HF forward, over the final sequence, of the weights whose version
the token carries. Plus SGLang's own span format and protocol fields (the pinned wheel)."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from rfpo_megatron.rollout import SamplingParams, launch_engine
from rfpo_megatron.rollout.base import GenerateResult
from rfpo_megatron.rollout.partial import generate_resumable, token_versions
from tiny_hf import make_tiny_hf_model

torch.set_num_threads(1)
PROMPTS = [[1, 5, 9, 33], [7, 8, 12]]
N_NEW = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("partial_models")
    return make_tiny_hf_model(root / "m1", seed=1), make_tiny_hf_model(root / "m2", seed=2)


@pytest.fixture(scope="module")
def slow_client(models, tmp_path_factory):
    """An embedded engine process that sleeps 40 ms per decode step (a deterministic slow engine)."""
    old = os.environ.get("RFPO_EMBEDDED_DECODE_SLEEP_S")
    os.environ["RFPO_EMBEDDED_DECODE_SLEEP_S"] = "0.04"
    try:
        c = launch_engine({"backend": "embedded", "model_path": str(models[0]),
                           "log_dir": str(tmp_path_factory.mktemp("logs"))})
    finally:
        if old is None:
            os.environ.pop("RFPO_EMBEDDED_DECODE_SLEEP_S")
        else:
            os.environ["RFPO_EMBEDDED_DECODE_SLEEP_S"] = old
    yield c
    c.shutdown()


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def _weights(path):
    from safetensors.torch import load_file

    return sorted(load_file(str(path / "model.safetensors")).items())


@torch.no_grad()
def _ref_logprobs(model, prompt, out_ids, temperature):
    """[L] float64 log softmax(logits / T)[token] of one cache-free forward over prompt + out_ids."""
    ids = torch.tensor([list(prompt) + list(out_ids)])
    rows = model(input_ids=ids).logits[0].double()[len(prompt) - 1: len(prompt) - 1 + len(out_ids)]
    lp = torch.log_softmax(rows / temperature, dim=-1)
    return [float(lp[k, t]) for k, t in enumerate(out_ids)]


def _push(client, path, version):
    """A weight update between engine batches: pause (running requests return what they have), update, go on."""
    client.pause_generation()
    assert client.server_info()["busy"] is False
    with client.weight_update_session():
        client.update_weights_from_tensors(_weights(path), flush_cache=False, weight_version=str(version))
    client.continue_generation()


def _wait_progress(client, n, timeout=60):
    start, deadline = client.server_info()["progress"], time.time() + timeout
    while client.server_info()["progress"] < start + n:
        assert time.time() < deadline, "the engine made no progress"
        time.sleep(0.01)


def test_interrupted_generation_segments_carry_their_weights_logprobs(slow_client, models):
    temperature = 0.9
    box = {}
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=N_NEW, ignore_eos=True, seed=7)
    th = threading.Thread(target=lambda: box.update(out=generate_resumable(slow_client, PROMPTS, params)))
    th.start()
    _wait_progress(slow_client, 6)
    _push(slow_client, models[1], 1)  # m2 = version 1
    _wait_progress(slow_client, 6)
    _push(slow_client, models[0], 2)  # back to m1 = version 2
    th.join(120)
    assert not th.is_alive()
    refs = {0: _load(models[0]), 1: _load(models[1]), 2: _load(models[0])}
    worst, seen = 0.0, set()
    for prompt, row in zip(PROMPTS, box["out"]):
        for res in row:
            # nothing lost: the full budget, one log-prob and one version per token, length-finished
            assert len(res.output_ids) == len(res.logprobs) == len(res.meta["token_versions"]) == N_NEW
            assert res.finish_reason == "length"
            versions = res.meta["token_versions"]
            assert versions == sorted(versions)  # segments in order: 0..., 1..., 2...
            assert res.meta["segments"] == len(set(versions))
            seen.update(versions)
            for v in set(versions):
                ref = _ref_logprobs(refs[v], prompt, res.output_ids, temperature)
                for t in (t for t in range(N_NEW) if versions[t] == v):
                    worst = max(worst, abs(res.logprobs[t] - ref[t]))
            # the other weights do NOT explain the resumed segment (the check can fail)
            later = [t for t in range(N_NEW) if versions[t] == 1]
            if later:
                wrong = _ref_logprobs(refs[0], prompt, res.output_ids, temperature)
                assert max(abs(res.logprobs[t] - wrong[t]) for t in later) > 1e-2
    assert seen == {0, 1, 2}, seen
    assert worst < 1e-4, worst
    # after the last update the engine serves version 2 and reports it
    after = slow_client.generate([[3, 4]], SamplingParams(max_new_tokens=2, ignore_eos=True))[0][0]
    assert after.meta["weight_version"] == "2"


def test_paused_engine_holds_new_requests_until_continue(slow_client):
    slow_client.pause_generation()
    box = {}
    th = threading.Thread(target=lambda: box.update(out=slow_client.generate(
        [[3, 4]], SamplingParams(max_new_tokens=3, ignore_eos=True))))
    th.start()
    time.sleep(0.5)
    assert th.is_alive() and "out" not in box  # held, not refused and not run
    slow_client.continue_generation()
    th.join(30)
    assert box["out"][0][0].finish_reason == "length" and len(box["out"][0][0].output_ids) == 3


def test_token_versions_from_sglang_weight_version_spans():
    """SGLang 0.5.23 (utils/weight_versions.py add_weight_versions_to_meta_info) reports in_place/retract pauses
    as meta_info.weight_versions [{version, start, end}]; "default" is the start weights (0)."""
    meta = {"weight_version": "7", "weight_versions": [{"version": "default", "start": 0, "end": 2},
                                                        {"version": "5", "start": 2, "end": 3},
                                                        {"version": "7", "start": 3, "end": 5}]}
    res = GenerateResult(output_ids=[9, 9, 9, 9, 9], logprobs=[0.0] * 5, finish_reason="length", meta=meta)
    assert token_versions(res) == [0, 0, 5, 7, 7]
    plain = GenerateResult(output_ids=[1, 2], logprobs=[0.0, 0.0], finish_reason="stop", meta={"weight_version": "3"})
    assert token_versions(plain) == [3, 3]


def test_client_pause_bodies_match_sglang_schema():
    """The bodies the client posts to /pause_generation and /continue_generation are valid SGLang 0.5.23
    PauseGenerationReqInput / ContinueGenerationReqInput (read from the pinned wheel's io_struct.py), and the
    routes exist in its http_server.py."""
    import ast

    from sglang_ref import available, ref_dir

    if available():
        pytest.skip(available())
    root = ref_dir()
    http = open(os.path.join(root, "sglang", "srt", "entrypoints", "http_server.py")).read()
    for route in ('@app.post("/pause_generation")', '@app.post("/continue_generation")', '@app.post("/abort_request")'):
        assert route in http, route
    tree = ast.parse(open(os.path.join(root, "sglang", "srt", "managers", "io_struct.py")).read())
    fields = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in ("PauseGenerationReqInput", "ContinueGenerationReqInput"):
            fields[node.name] = {t.target.id: t for t in node.body if isinstance(t, ast.AnnAssign)}
    mode = fields["PauseGenerationReqInput"]["mode"]
    assert ast.literal_eval(mode.value) == "abort"  # SGLang's default is the mode the embedded engine implements
    assert "abort" in ast.unparse(mode.annotation)
    assert set(fields["ContinueGenerationReqInput"]) <= {"torch_empty_cache"}  # the client's {} is valid
