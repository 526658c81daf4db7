"""SGLang side of rollout: launch command lines, GPU grouping, version checks, SGLang's tensor payload,
and the multi-server launcher driven end to end with embedded servers standing in for SGLang."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from rfpo_megatron.rollout import EngineClient, EngineError, SamplingParams
from rfpo_megatron.rollout import weights as W
from rfpo_megatron.rollout.sglang import (args_to_cli, build_router_cmd, build_server_cmd, check_sglang_installed,
                                          gpu_groups, launch_sglang)


def test_args_to_cli_renders_every_kind_of_value():
    args = {"mem_fraction_static": 0.7, "enable_memory_saver": True, "disable_radix_cache": False,
            "chunked_prefill_size": None, "cuda_graph_bs": [1, 2, 4], "json_model_override_args": {"a": 1}}
    assert args_to_cli(args) == ["--mem-fraction-static", "0.7", "--enable-memory-saver", "--cuda-graph-bs", "1", "2", "4",
                                 "--json-model-override-args", '{"a": 1}']


def test_build_server_and_router_cmds():
    cmd = build_server_cmd("/m", "127.0.0.1", 30001, 2, {"dtype": "bfloat16", "skip_tokenizer_init": True}, python="py")
    assert cmd == ["py", "-m", "sglang.launch_server", "--model-path", "/m", "--host", "127.0.0.1", "--port", "30001",
                   "--tp-size", "2", "--dtype", "bfloat16", "--skip-tokenizer-init"]
    with pytest.raises(ValueError, match="must not set \\['port'\\]"):
        build_server_cmd("/m", "h", 1, 1, {"port": 5})
    rc = build_router_cmd(["http://a:1", "http://b:2"], "0.0.0.0", 30000, {"policy": "cache_aware"}, python="py",
                          prometheus_port=30099)
    assert rc == ["py", "-m", "sglang_router.launch_router", "--worker-urls", "http://a:1", "http://b:2", "--host",
                  "0.0.0.0", "--port", "30000", "--health-check-endpoint", "/get_model_info", "--disable-retries",
                  "--prometheus-host", "0.0.0.0", "--prometheus-port", "30099", "--policy", "cache_aware"]
    # router_args override the defaults (e.g. back to SGLang's generating /health check)
    rc = build_router_cmd(["http://a:1"], "h", 1, {"health_check_endpoint": "/health", "disable_retries": False},
                          prometheus_port=2)
    assert "--disable-retries" not in rc and rc[rc.index("--health-check-endpoint") + 1] == "/health"


def test_gpu_groups():
    assert gpu_groups(4, 2) == ["0,1", "2,3"]
    assert gpu_groups(4, 1, "4,5,6,7") == ["4", "5", "6", "7"]
    assert gpu_groups(2, 2, "3, 1") == ["3,1"]
    with pytest.raises(ValueError, match="multiple of rollout.tp_size"):
        gpu_groups(3, 2)
    with pytest.raises(ValueError, match="only 2 GPUs are visible"):
        gpu_groups(4, 2, "0,1")


def test_version_checks():
    c = EngineClient("http://127.0.0.1:1")
    c.check_sglang_version("0.5.4")
    c.check_sglang_version("0.5.10rc1")
    c.check_sglang_version("1.0.0")
    for bad in ("0.5.3", "0.4.10", None, "garbage"):
        with pytest.raises(EngineError, match="SGLang >= 0.5.4"):
            c.check_sglang_version(bad)
    if importlib.util.find_spec("sglang") is None:
        with pytest.raises(EngineError, match="not installed .*rollout.backend=embedded"):
            check_sglang_installed()
        with pytest.raises(EngineError, match="not installed"):
            launch_sglang("/nonexistent")


def test_sglang_tensor_payload_roundtrip():
    """One separate dump per TP rank (SGLang's own decoder is the other end in test_rollout_sglang_ref.py)."""
    named = [("model.embed_tokens.weight", torch.randn(5, 3)), ("lm_head.weight", torch.arange(6.0).reshape(2, 3).bfloat16())]
    payload = W.encode_sglang_named_tensors(named, tp_size=2)
    assert len(payload) == 2 and payload[0] != payload[1] and isinstance(payload[0], str)
    for entry in payload:
        back = W.decode_sglang_named_tensors(entry)
        assert [n for n, _ in back] == [n for n, _ in named]
        for (_, a), (_, b) in zip(named, back):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_version_dependent_protocol():
    """Sessions from 0.5.21, the cuda_graph release tag from 0.5.5 (the client reads /get_server_info once)."""
    from rfpo_megatron.rollout import EngineConnectionError

    c = EngineClient("http://127.0.0.1:1", retries=0)
    for version, session, tags in [("0.5.4", False, ["weights", "kv_cache"]),
                                   ("0.5.5", False, ["weights", "kv_cache", "cuda_graph"]),
                                   ("0.5.20", False, ["weights", "kv_cache", "cuda_graph"]),
                                   ("0.5.21", True, ["weights", "kv_cache", "cuda_graph"])]:
        c._kind, c._version = "sglang", tuple(int(x) for x in version.split("."))
        assert c.needs_weight_session is session and c.memory_tags == tags, version
        if session:  # /begin_weight_update is called (and fails: nothing listens on port 1)
            with pytest.raises(EngineConnectionError, match="begin_weight_update"), c.weight_update_session():
                pass
        else:  # before 0.5.21: no HTTP call at all
            with c.weight_update_session():
                pass


def test_safetensors_payload_roundtrip_and_errors():
    named = [("a.weight", torch.randn(4, 2)), ("b.bias", torch.ones(3, dtype=torch.bfloat16))]
    back = dict(W.decode_safetensors_b64(W.encode_safetensors_b64(named)))
    assert all(torch.equal(back[n], t) for n, t in named)
    with pytest.raises(ValueError, match="twice"):
        W.encode_safetensors_b64(named + named[:1])
    with pytest.raises(ValueError, match="not base64 safetensors"):
        W.decode_safetensors_b64("!!!")
    assert W.torch_dtype_name(torch.bfloat16) == "bfloat16" and W.dtype_from_name("torch.float32") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        W.dtype_from_name("float99")


@pytest.mark.slow
def test_launch_two_servers_without_router_fans_out(tmp_path):
    """launch_sglang's process/health/fan-out logic with two embedded servers in place of SGLang servers."""
    from tiny_hf import make_tiny_hf_model

    m1 = make_tiny_hf_model(tmp_path / "m1", seed=1)
    m2 = make_tiny_hf_model(tmp_path / "m2", seed=2)
    client = launch_sglang(str(m1), num_gpus=2, tp_size=1, server_args={"log_every_s": 0.5}, router=False,
                           log_dir=tmp_path / "logs", launch_module="rfpo_megatron.rollout.server",
                           env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, max_items_per_request=3,
                           startup_timeout_s=300)
    try:
        assert client.url is None and len(client.worker_urls) == 2 and client.kind == "embedded"
        assert all("--log-every-s" in p.cmd for p in client.processes)
        prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
        params = SamplingParams(n=2, max_new_tokens=6, seed=9, ignore_eos=True)
        before = [client.server_info(u)["progress"] for u in client.worker_urls]
        out1 = client.generate(prompts, params)
        after = [client.server_info(u)["progress"] for u in client.worker_urls]
        assert all(a > b for a, b in zip(after, before))  # both workers generated
        from safetensors.torch import load_file

        with client.weight_update_session():
            client.update_weights_from_tensors(load_file(str(m2 / "model.safetensors")).items())
        out2 = client.generate(prompts, params)
        assert [[r.output_ids for r in row] for row in out2] != [[r.output_ids for r in row] for row in out1]
        single = EngineClient(client.worker_urls[1])  # each worker got the update: same answers from either
        assert [[r.output_ids for r in row] for row in single.generate(prompts, params)] == \
               [[r.output_ids for r in row] for row in out2]
        pids = [p.pid for p in client.processes]
    finally:
        client.shutdown()
    assert all(not p.alive() for p in client.processes) and len(pids) == 2
