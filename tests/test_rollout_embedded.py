"""Embedded rollout server over real loopback HTTP: log-probs vs teacher forcing, sampling rules,
seeds, weight updates (tensor / disk / distributed gloo), release/resume, abort, malformed requests."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests
import torch

from rfpo_megatron.rollout import EngineError, EngineRequestError, SamplingParams, derive_seed, launch_engine
from rfpo_megatron.rollout import weights as W
from rfpo_megatron.rollout.embedded import EmbeddedEngine, GenItem
from rfpo_megatron.rollout.procs import free_port
from tiny_hf import make_tiny_hf_model

torch.set_num_threads(1)
PROMPTS = [[1, 5, 9, 33], [7, 8], [100, 101, 102, 103, 104, 105, 106], [42]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_models")
    return make_tiny_hf_model(root / "m1", seed=1), make_tiny_hf_model(root / "m2", seed=2)


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    c = launch_engine({"backend": "embedded", "model_path": str(models[0]), "log_dir": str(tmp_path_factory.mktemp("logs")),
                       "retries": 2, "retry_backoff_s": 0.1, "max_items_per_request": 5})
    yield c
    c.shutdown()
    assert not c.processes[0].alive()


def load_ref(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def refs(models):
    return load_ref(models[0]), load_ref(models[1])


@torch.no_grad()
def teacher_forced(model, prompt, out_ids, temperature, original=False):
    """float64 log-softmax of one unpadded, cache-free forward over prompt+output: [L] log-probs, [L, V] rows."""
    ids = torch.tensor([list(prompt) + list(out_ids)])
    logits = model(input_ids=ids).logits[0].double()
    rows = logits[len(prompt) - 1: len(prompt) - 1 + len(out_ids)]
    t = 1.0 if (temperature < 1e-6 or original) else temperature
    lp = torch.log_softmax(rows / t, dim=-1)
    return [float(lp[k, tok]) for k, tok in enumerate(out_ids)], rows


def state_of(path):
    from safetensors.torch import load_file

    return sorted(load_file(str(path / "model.safetensors")).items())


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.9, 50), (1.3, 1.0, 20), (0.0, 1.0, -1)])
def test_logprobs_match_teacher_forced_forward(client, refs, temperature, top_p, top_k):
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=12, seed=11)
    out = client.generate(PROMPTS, params)
    assert len(out) == len(PROMPTS) and all(len(row) == 3 for row in out)
    worst = 0.0
    for prompt, row in zip(PROMPTS, out):
        for res in row:
            assert len(res.output_ids) == len(res.logprobs) >= 1
            if res.finish_reason == "stop":
                assert res.output_ids[-1] == 2 and 2 not in res.output_ids[:-1]
            else:
                assert res.finish_reason == "length" and len(res.output_ids) == 12
            ref_lp, rows = teacher_forced(refs[0], prompt, res.output_ids, temperature)
            worst = max(worst, max(abs(a - b) for a, b in zip(res.logprobs, ref_lp)))
            sorted_rows = rows.sort(dim=-1, descending=True)
            for k, tok in enumerate(res.output_ids):
                rank = int((sorted_rows.indices[k] == tok).nonzero())
                if temperature == 0.0:
                    assert rank == 0  # greedy = argmax of the reference logits
                if top_k > 0:
                    assert rank < top_k
                if top_p < 1.0:  # nucleus: mass strictly before the token <= top_p
                    p = torch.softmax(sorted_rows.values[k] / temperature, -1)
                    assert float(p[:rank].sum()) <= top_p + 1e-6
    assert worst <= 1e-4, worst


def test_original_logprob_convention_in_process(models, refs):
    """return_original_logprob=True reports log softmax(logits), SGLANG_RETURN_ORIGINAL_LOGPROB's convention."""
    eng = EmbeddedEngine(str(models[0]), return_original_logprob=True)
    [res] = eng.generate([GenItem(rid="a", input_ids=PROMPTS[0], max_new_tokens=6, temperature=0.5, seed=3,
                                  return_logprob=True, ignore_eos=True)])
    olp = res["meta_info"]["output_token_logprobs"]
    ids = [x[1] for x in olp]
    ref, _ = teacher_forced(refs[0], PROMPTS[0], ids, 0.5, original=True)
    assert max(abs(x[0] - r) for x, r in zip(olp, ref)) <= 1e-4
    scaled, _ = teacher_forced(refs[0], PROMPTS[0], ids, 0.5)
    assert max(abs(x[0] - r) for x, r in zip(olp, scaled)) > 1e-2  # the two conventions really differ


def test_seed_reproducible_and_independent_of_batch(client):
    p = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=123, ignore_eos=True)
    a = client.generate(PROMPTS, p)
    b = client.generate(PROMPTS, p)
    assert [[r.output_ids for r in row] for row in a] == [[r.output_ids for r in row] for row in b]
    alone = client.generate(PROMPTS[:1], p)  # prompt 0 alone gets the same derived seeds
    assert [r.output_ids for r in alone[0]] == [r.output_ids for r in a[0]]
    assert a[0][0].output_ids != a[0][1].output_ids  # the n samples differ
    c = client.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=124, ignore_eos=True))
    assert [r.output_ids for r in c[0]] != [r.output_ids for r in a[0]]


def test_stop_tokens_and_length(client, refs):
    # greedy continuation of prompt 1, then stop at its 3rd token
    g = client.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))[0][0]
    assert g.finish_reason == "length" and len(g.output_ids) == 8
    stop = g.output_ids[2]
    first = g.output_ids.index(stop)
    s = client.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=[stop],
                                                     ignore_eos=True))[0][0]
    assert s.finish_reason == "stop" and s.output_ids == g.output_ids[:first + 1]
    assert s.meta["finish_reason"] == {"type": "stop", "matched": stop}
    z = client.generate([PROMPTS[1]], SamplingParams(max_new_tokens=0))[0][0]
    assert z.output_ids == [] and z.finish_reason == "length"


def _fresh_reference(path, prompts, params, chunk=5):
    """Outputs of a freshly loaded in-process engine, same derived seeds and same request chunks as the client
    (max_items_per_request=5), so that even the padded batch shapes are the same: results must be identical."""
    eng = EmbeddedEngine(str(path))
    items = [GenItem(rid=f"{i}-{j}", input_ids=p, max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                     top_p=params.top_p, top_k=params.top_k, ignore_eos=params.ignore_eos,
                     seed=derive_seed(params.seed, i, j), return_logprob=True)
             for i, p in enumerate(prompts) for j in range(params.n)]
    outs = [o for s in range(0, len(items), chunk) for o in eng.generate(items[s:s + chunk])]
    return [([x[1] for x in o["meta_info"]["output_token_logprobs"]], [x[0] for x in o["meta_info"]["output_token_logprobs"]])
            for o in outs]


def _flat(out):
    return [(r.output_ids, r.logprobs) for row in out for r in row]


P_CMP = SamplingParams(n=2, temperature=0.9, top_p=0.95, max_new_tokens=10, seed=7, ignore_eos=True)


@pytest.mark.parametrize("same_host", [True, False], ids=["shm", "base64"])
def test_weight_update_from_tensors_equals_fresh_engine(client, models, same_host, monkeypatch):
    """Both payload forms: the shared-memory file (the default for a server this client launched) and base64."""
    monkeypatch.setattr(client, "same_host", same_host)
    sent = []
    real = client.tensor_payloads
    monkeypatch.setattr(client, "tensor_payloads", lambda *a, **k: sent.append(real(*a, **k)) or sent[-1])
    before = _flat(client.generate(PROMPTS, P_CMP))
    assert before == _fresh_reference(models[0], PROMPTS, P_CMP)
    new = state_of(models[1])
    half = len(new) // 2
    with client.weight_update_session():
        client.update_weights_from_tensors(new[:half], weight_version="v1")  # two buckets
        client.update_weights_from_tensors(new[half:], weight_version="v2")
    after = client.generate(PROMPTS, P_CMP)
    assert _flat(after) == _fresh_reference(models[1], PROMPTS, P_CMP)
    assert _flat(after) != before
    assert after[0][0].meta["weight_version"] == "v2"
    client.update_weights_from_disk(str(models[0]))  # back to m1 from disk
    assert _flat(client.generate(PROMPTS, P_CMP)) == before
    assert {b[0]["load_format"] for b in sent} == {W.SAFETENSORS_SHM if same_host else W.SAFETENSORS_B64}


def test_shm_payload_is_a_safetensors_file_and_only_shm_files_are_read(client, tmp_path):
    """write_safetensors_shm's file read back by safetensors' own loader (every dtype the weights use, a 0-d and
    an empty tensor, a non-contiguous view); the server refuses paths that are not the trainer's shm payloads."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    named = [("a.weight", base), ("b.bf16", torch.randn(3, 5, generator=g).to(torch.bfloat16)),
             ("c.half", torch.randn(2, generator=g).half()), ("d.ids", torch.arange(7)), ("e.flag", torch.tensor([True, False])),
             ("f.scalar", torch.tensor(2.5)), ("g.empty", torch.zeros(0, 3)), ("h.view", base.t()[1:3])]
    path = f"{W.shm_dir()}/{W.SHM_PREFIX}test_{id(named)}"
    try:
        W.write_safetensors_shm(named, path)
        got = load_file(path)
        assert set(got) == {n for n, _ in named}
        for n, t in named:
            assert got[n].dtype == t.dtype and got[n].shape == t.shape and torch.equal(got[n], t), n
        with safe_open(path, "pt") as fh:
            assert sorted(fh.keys()) == sorted(n for n, _ in named)
        back = dict(W.read_safetensors_shm(path))
        assert set(back) == set(got) and all(torch.equal(back[n], got[n]) for n in got)
    finally:
        import os

        os.remove(path)
    elsewhere = tmp_path / f"{W.SHM_PREFIX}x"
    W.write_safetensors_shm(named[:1], str(elsewhere))
    with pytest.raises(ValueError, match="not a rfpo_weights_"):
        W.read_safetensors_shm(str(elsewhere))
    with client.weight_update_session():
        for bad in (str(elsewhere), "/etc/passwd", f"{W.shm_dir()}/{W.SHM_PREFIX}missing"):
            with pytest.raises(EngineRequestError) as e:
                client._all_workers("POST", "/update_weights_from_tensor",
                                    {"serialized_named_tensors": [bad], "load_format": W.SAFETENSORS_SHM})
            assert e.value.status == 400 and ("not a rfpo_weights_" in str(e.value) or "does not exist" in str(e.value))


def test_weight_update_distributed_gloo_equals_fresh_engine(client, models):
    import torch.distributed as dist

    port = free_port()
    group = client.connect_weights_update_group("127.0.0.1", port, group_name="wu_test", backend="gloo", timeout_s=60)
    try:
        assert group.size() == 2 and group.rank() == 0
        new = state_of(models[1])
        with client.weight_update_session():
            client.push_weights_distributed(group, new[:5], group_name="wu_test")
            client.push_weights_distributed(group, new[5:], group_name="wu_test")
        assert _flat(client.generate(PROMPTS, P_CMP)) == _fresh_reference(models[1], PROMPTS, P_CMP)
    finally:
        client.destroy_weights_update_group(group, group_name="wu_test")
        client.update_weights_from_disk(str(models[0]))


def test_distributed_update_refused_by_the_server_fails_fast(client, models):
    """A server that refuses /update_weights_from_distributed (here: no session open) answers 400 before it
    receives anything; the trainer's broadcast must fail with that message, not wait for the group timeout."""
    port = free_port()
    group = client.connect_weights_update_group("127.0.0.1", port, group_name="wu_refused", backend="gloo",
                                                timeout_s=60)
    t0 = time.time()
    with pytest.raises(EngineError, match="begin_weight_update") as e:
        client.push_weights_distributed(group, state_of(models[1])[:3], group_name="wu_refused")
    assert time.time() - t0 < 30, "the refused broadcast waited instead of failing"
    assert "cannot be used again" in str(e.value)
    client._all_workers("POST", "/destroy_weights_update_group", {"group_name": "wu_refused"})
    assert _flat(client.generate(PROMPTS, P_CMP)) == _fresh_reference(models[0], PROMPTS, P_CMP)  # nothing applied


def test_release_resume_then_push(client, models):
    """As SGLang >= 0.5.5: a tag-less release frees weights, KV cache and CUDA graphs; generation is refused
    until every tag is resumed (resuming only weights + kv_cache, the old trainer's calls, is not enough)."""
    before = _flat(client.generate(PROMPTS, P_CMP))
    assert client.memory_tags == ["weights", "kv_cache", "cuda_graph"]
    client.release_memory()
    assert sorted(client.server_info()["released"]) == ["cuda_graph", "kv_cache", "weights"]
    with pytest.raises(EngineRequestError, match="resume_memory_occupation") as e:
        client.generate(PROMPTS, P_CMP)
    assert e.value.status == 400
    seen = client.server_info()["health_while_released"]
    assert not client.health()  # SGLang's /health would generate on released memory: 503 and counted
    assert client.server_info()["health_while_released"] == seen + 1
    client.resume_memory(["weights"])
    with client.weight_update_session():
        client.update_weights_from_tensors(state_of(models[0]))
    client.resume_memory(["kv_cache"])
    with pytest.raises(EngineRequestError, match="cuda_graph"):
        client.generate(PROMPTS, P_CMP)
    client.resume_memory(["cuda_graph"])
    client.flush_cache()
    assert _flat(client.generate(PROMPTS, P_CMP)) == before


def test_weight_updates_need_a_session_like_sglang_0_5_21(client, models):
    """Outside /begin_weight_update ... /end_weight_update tensor and distributed updates get SGLang's 400."""
    assert client.needs_weight_session and client.protocol_version == (0, 5, 23)
    with pytest.raises(EngineRequestError, match="between begin_weight_update\\(\\) and end_weight_update") as e:
        client.update_weights_from_tensors(state_of(models[0])[:1])
    assert e.value.status == 400
    body = {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "g"}
    r = requests.post(client.url + "/update_weights_from_distributed", json=body)
    assert r.status_code == 400 and "begin_weight_update" in r.json()["message"]
    client.begin_weight_update()
    try:
        r = requests.post(client.url + "/begin_weight_update", json={})
        assert r.status_code == 400 and "already open" in r.json()["message"]
        assert client.server_info()["weight_update_session"] is True
    finally:
        client.end_weight_update()
    r = requests.post(client.url + "/end_weight_update", json={})
    assert r.status_code == 400 and "no weight-update session" in r.json()["message"]
    with pytest.raises(RuntimeError, match="boom"):  # a failed update still closes the session
        with client.weight_update_session():
            raise RuntimeError("boom")
    assert client.server_info()["weight_update_session"] is False


def test_context_overflow_fails_the_request_unless_auto_truncate(client, models, tmp_path):
    """SGLang 400s prompt + max_new_tokens > context length (the embedded engine used to clip silently)."""
    ctx = client.server_info()["context_length"]
    with pytest.raises(EngineRequestError, match="maximum context length") as e:
        client.generate([[3] * (ctx - 4)], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert e.value.status == 400
    out = client.generate([[3] * (ctx - 8)], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert len(out[0][0].output_ids) == 8  # exactly at the limit is fine
    trunc = launch_engine({"backend": "embedded", "model_path": str(models[0]), "log_dir": str(tmp_path),
                           "allow_auto_truncate": True})
    try:
        res = trunc.generate([[3] * (ctx - 4)], SamplingParams(max_new_tokens=8, ignore_eos=True))[0][0]
        assert len(res.output_ids) == 4 and res.finish_reason == "length"
    finally:
        trunc.shutdown()


def test_flush_and_release_refused_while_generating(client):
    """SGLang flushes the cache and releases memory only when idle; the client retries the busy flush. On a
    loaded box the 400-token batch can end before the flush arrives (then the flush is answered 200): retried
    with a new batch, at most 5 times."""
    for attempt in range(5):
        box = {}
        th = threading.Thread(target=lambda: box.setdefault(
            "out", client.generate([[3, 4]] * 16, SamplingParams(max_new_tokens=400, ignore_eos=True, seed=3))))
        start = client.server_info()["progress"]
        th.start()
        deadline = time.time() + 30
        while client.server_info()["progress"] < start + 3 and time.time() < deadline:
            time.sleep(0.01)
        r = requests.post(client.url + "/flush_cache")
        if r.status_code == 200:  # the batch was already done
            th.join(60)
            continue
        assert r.status_code == 400 and "running" in r.text
        r = requests.post(client.url + "/release_memory_occupation", json={})
        if r.status_code == 200:  # done between the two calls: resume and try again
            th.join(60)
            client.resume_memory()
            continue
        assert r.status_code == 400 and "idle" in r.json()["message"]
        client.flush_cache(attempts=200, wait_s=0.1)  # retried until the batch is done
        th.join(60)
        assert len(box["out"][0][0].output_ids) == 400
        return
    pytest.fail("the 400-token batch ended before the flush arrived in 5 tries")


def test_abort_all_ends_running_request(client):
    box = {}

    def run():
        box["out"] = client.generate([[3, 4, 5]] * 4, SamplingParams(max_new_tokens=900, ignore_eos=True, seed=1))

    start = client.server_info()["progress"]
    th = threading.Thread(target=run)
    th.start()
    deadline = time.time() + 30
    while client.server_info()["progress"] < start + 5 and time.time() < deadline:
        time.sleep(0.02)
    client.abort()
    th.join(60)
    res = [r for row in box["out"] for r in row]
    assert all(r.finish_reason == "abort" for r in res)
    assert all(0 < len(r.output_ids) < 900 and len(r.logprobs) == len(r.output_ids) for r in res)
    # the server still works afterwards
    assert client.generate([[3]], SamplingParams(max_new_tokens=2, ignore_eos=True))[0][0].finish_reason == "length"


def test_client_implements_the_engine_protocol(client):
    from rfpo_megatron.rollout import RolloutEngine

    assert isinstance(client, RolloutEngine)


def test_raw_sglang_response_shapes(client):
    url = client.url
    single = requests.post(url + "/generate", json={"input_ids": [1, 2, 3], "return_logprob": True,
                                                    "sampling_params": {"max_new_tokens": 3, "temperature": 0}}).json()
    assert isinstance(single, dict) and len(single["meta_info"]["output_token_logprobs"]) == 3
    lp, tok, text = single["meta_info"]["output_token_logprobs"][0]
    assert isinstance(lp, float) and tok == single["output_ids"][0] and text is None
    batch = requests.post(url + "/generate", json={"input_ids": [[1, 2], [3]], "rid": ["a", "b"],
                                                   "sampling_params": {"max_new_tokens": 2, "n": 2, "temperature": 0}}).json()
    # n is expanded prompt-major like SGLang: [p0s0, p0s1, p1s0, p1s1]; greedy -> equal within a prompt
    assert len(batch) == 4 and batch[0]["output_ids"] == batch[1]["output_ids"]
    assert "output_token_logprobs" not in batch[0]["meta_info"]
    info = requests.get(url + "/get_server_info").json()
    assert info["engine"] == "rfpo-embedded" and "version" in info
    assert requests.get(url + "/health_generate").status_code == 200


MALFORMED = [
    ("/generate", b"{not json", "not valid JSON"),
    ("/generate", {"sampling_params": {}}, "input_ids is required"),
    ("/generate", {"text": "hello"}, "text"),
    ("/generate", {"input_ids": []}, "non-empty"),
    ("/generate", {"input_ids": [1, "x"]}, "list of ints"),
    ("/generate", {"input_ids": [1, 99999]}, "outside the vocabulary"),
    ("/generate", {"input_ids": [1], "sampling_params": {"top_p": 0}}, "top_p"),
    ("/generate", {"input_ids": [1], "sampling_params": {"temperature": -1}}, "temperature"),
    ("/generate", {"input_ids": [1], "sampling_params": {"bogus": 1}}, "unknown sampling_params"),
    ("/generate", {"input_ids": [1], "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
    ("/generate", {"input_ids": [[1], [2]], "sampling_params": [{}]}, "1 entries for 2 prompts"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": ["AAAA"], "load_format": "rfpo_safetensors_b64"}, "safetensors"),
    ("/update_weights_from_tensor", {"load_format": "rfpo_safetensors_b64"}, "serialized_named_tensors"),
    ("/update_weights_from_disk", {"model_path": "/nonexistent/dir"}, "no *.safetensors"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": "x", "rank_offset": 1,
                                    "world_size": 2}, "master_port"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]],
                                          "group_name": "nope"}, "init_weights_update_group"),
    ("/release_memory_occupation", {"tags": ["gpu"]}, "tags"),
]


@pytest.mark.parametrize("path,body,needle", MALFORMED)
def test_malformed_requests_get_400(client, path, body, needle):
    with client.weight_update_session():  # so the update endpoints check their bodies, not the session
        if isinstance(body, bytes):
            r = requests.post(client.url + path, data=body, headers={"Content-Type": "application/json"})
        else:
            r = requests.post(client.url + path, json=body)
    assert r.status_code == 400, r.text
    msg = r.json()["message"]
    assert needle in msg and r.json()["code"] == 400


def test_unknown_top_level_generate_fields_are_ignored_like_sglang(client):
    """SGLang's GenerateRequest ignores unknown keys (sglang_router adds model, return_bytes, return_entropy);
    unknown sampling_params keys stay an error (SGLang's SamplingParams rejects them)."""
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "temperature": 0}, "model": "m",
            "return_bytes": False, "return_entropy": False}
    r = requests.post(client.url + "/generate", json=body)
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 2


def test_bad_weight_names_and_shapes_rejected_without_partial_update(client, models):
    before = _flat(client.generate(PROMPTS, P_CMP))
    good = state_of(models[1])[:2]
    with pytest.raises(EngineRequestError, match="unknown weight names"), client.weight_update_session():
        client.update_weights_from_tensors(good + [("model.not_a_weight", torch.zeros(2))])
    with pytest.raises(EngineRequestError, match="shape mismatch"), client.weight_update_session():
        client.update_weights_from_tensors(good[1:] + [(good[0][0], torch.zeros(3, 3))])
    assert _flat(client.generate(PROMPTS, P_CMP)) == before  # nothing was applied
    r = requests.get(client.url + "/generate")
    assert r.status_code == 405
    assert requests.post(client.url + "/no_such_endpoint", json={}).status_code == 404


def test_sglang_tensor_payload_refused_by_embedded_with_clear_message(client, models):
    payload = {"serialized_named_tensors": W.encode_sglang_named_tensors(state_of(models[1])[:1]), "load_format": None,
               "flush_cache": True}
    with client.weight_update_session():
        r = requests.post(client.url + "/update_weights_from_tensor", json=payload)
    assert r.status_code == 400 and "rfpo_safetensors_b64" in r.json()["message"]


def test_cli_serve_rejects_missing_model_dir(tmp_path):
    from rfpo_megatron.rollout.server import main

    assert main(["--model-path", str(tmp_path / "missing"), "--port", "0"]) == 2


def test_request_payload_fields_match_sglang_generate_req_input(client):
    """Field names the client sends exist in SGLang 0.5.x GenerateReqInput / SamplingParams (from its source)."""
    generate_req_fields = {"rid", "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                           "top_logprobs_num", "stream"}
    sampling_fields = {"max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p", "n",
                       "ignore_eos", "skip_special_tokens", "no_stop_trim", "sampling_seed"}
    chunks = client.build_generate_payloads(PROMPTS, SamplingParams(n=2, seed=5, stop_token_ids=[9]))
    assert [len(c[1]) for c in chunks] == [5, 3]  # max_items_per_request=5
    payload = {k: chunks[0][0][k] + chunks[1][0][k] if isinstance(chunks[0][0][k], list) else chunks[0][0][k]
               for k in chunks[0][0]}
    index = chunks[0][1] + chunks[1][1]
    assert set(payload) <= generate_req_fields
    assert all(set(sp) <= sampling_fields for sp in payload["sampling_params"])
    assert index == [(i, j) for i in range(4) for j in range(2)]
    assert len(set(payload["rid"])) == 8 and payload["input_ids"][2] == PROMPTS[1]
    seeds = [sp["sampling_seed"] for sp in payload["sampling_params"]]
    assert seeds[3] == derive_seed(5, 1, 1) and len(set(seeds)) == 8
    json.dumps(payload)


def test_external_backend_connects_to_running_server(client):
    ext = launch_engine({"backend": "external", "urls": [client.url], "startup_timeout_s": 30})
    try:
        assert ext.kind == "embedded" and ext.processes == []
        p = SamplingParams(n=1, max_new_tokens=4, seed=3)
        assert _flat(ext.generate(PROMPTS, p)) == _flat(client.generate(PROMPTS, p))
    finally:
        ext.shutdown()
    assert client.health() and client.processes[0].alive()  # an external client never stops the servers
    with pytest.raises(ValueError, match="rollout.urls"):
        launch_engine({"backend": "external"})
    with pytest.raises(ValueError, match="not one of"):
        launch_engine({"backend": "vllm"})


def test_batched_decode_with_finished_rows_dropped_equals_one_by_one(models):
    """Mixed prompt lengths, max_new_tokens and stop tokens in one batch (rows leave the batch and the
    KV cache as they finish) give the same samples as generating every item alone."""
    eng = EmbeddedEngine(str(models[0]))
    items = [GenItem(rid=f"r{k}", input_ids=PROMPTS[k % 4], max_new_tokens=3 + 4 * k, temperature=0.8, seed=100 + k,
                     stop_token_ids=[k * 37 % 300] if k % 2 else [], ignore_eos=True, return_logprob=True)
             for k in range(7)]
    together = eng.generate(items)
    for it, got in zip(items, together):
        [alone] = eng.generate([it])
        a = got["meta_info"]["output_token_logprobs"]
        b = alone["meta_info"]["output_token_logprobs"]
        assert [x[1] for x in a] == [x[1] for x in b] and got["meta_info"]["finish_reason"] == alone["meta_info"]["finish_reason"]
        assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) <= 1e-5
        assert len(a) == it.max_new_tokens or got["meta_info"]["finish_reason"]["type"] == "stop"


@pytest.mark.parametrize("temperature,top_p,top_k,min_p", [(1.0, 1.0, -1, 0.0), (0.5, 0.8, -1, 0.0),
                                                           (2.0, 1.0, 3, 0.0), (1.0, 0.95, 4, 0.2)])
def test_sampling_frequencies_match_filtered_distribution(temperature, top_p, top_k, min_p):
    """Empirical frequencies of the sampler vs the SGLang rule written as plain float64 loops."""
    import math
    from types import SimpleNamespace

    logits = [2.0, 1.5, 1.4, 0.3, -0.2, -1.0, 0.9]
    V, N = len(logits), 20000
    # reference: softmax(logits / T), sort, keep (mass before <= top_p) & (rank < top_k) & (p >= min_p * p_max)
    z = [l / temperature for l in logits]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    p = [v / sum(e) for v in e]
    order = sorted(range(V), key=lambda i: -p[i])
    kept, before = {}, 0.0
    for rank, i in enumerate(order):
        if (before <= top_p or rank == 0) and (top_k < 0 or rank < top_k) and p[i] >= min_p * p[order[0]]:
            kept[i] = p[i]
        before += p[i]
    expected = {i: q / sum(kept.values()) for i, q in kept.items()}

    g = torch.Generator().manual_seed(0)
    row = lambda x, dt=torch.float32: torch.tensor([x] * N, dtype=dt)  # noqa: E731
    tok, lp = EmbeddedEngine._sample(SimpleNamespace(return_original_logprob=False), torch.tensor([logits] * N),
                                     row(temperature), row(top_k if top_k > 0 else V, torch.long), row(top_p),
                                     row(min_p), torch.rand(N, generator=g, dtype=torch.float64),
                                     plain=top_p >= 1.0 and top_k < 0 and min_p <= 0.0)
    counts = torch.bincount(tok, minlength=V).double() / N
    for i in range(V):
        want = expected.get(i, 0.0)
        assert abs(float(counts[i]) - want) <= 4 * math.sqrt(want * (1 - want) / N) + 1e-9, (i, float(counts[i]), want)
    # reported log-prob: log softmax(logits / T) of the sampled token, not renormalised
    assert torch.allclose(lp.double(), torch.tensor([math.log(p[t]) for t in tok.tolist()], dtype=torch.float64), atol=1e-6)
