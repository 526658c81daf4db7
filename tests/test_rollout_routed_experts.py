"""Routed experts (R3) from the embedded engine, as SGLang 0.5.23 returns them (docs/rollout.md).

Reference: one HF ``Qwen3MoeForCausalLM`` forward over prompt + output tokens with ``output_router_logits``;
top-k of its router softmax per layer (HF's own routing) must equal the engine's rows, which cover positions
0 … prompt + output - 2 (SGLang's ``[start_len, seqlen - 1)``). The server flag, the request field and the
client decoding are checked over HTTP, and SGLang's own ServerArgs parser accepts the launch flag.
"""
from __future__ import annotations

import json

import pytest
import torch

from rfpo_megatron.rollout.base import decode_routed_experts
from rfpo_megatron.rollout.embedded import EmbeddedEngine, GenItem, RequestError

LAYERS, TOPK, EXPERTS = 3, 2, 4


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=EXPERTS, num_experts_per_tok=TOPK, norm_topk_prob=True, mlp_only_layers=[1],
                         max_position_embeddings=64, eos_token_id=49, pad_token_id=0, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:  # spread the router logits so top-k ties cannot occur
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("qwen3moe")
    model.save_pretrained(path)
    return path


def _hf_topk(path, ids):
    """HF's own routing of a sequence: [len(ids), LAYERS, TOPK] (dense layer 1: zeros, as SGLang's buffer)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = m(torch.tensor([ids]), output_router_logits=True)
    moe_layers = [i for i in range(LAYERS) if i != 1]
    assert len(out.router_logits) == len(moe_layers)
    ref = torch.zeros(len(ids), LAYERS, TOPK, dtype=torch.int32)
    for i, lg in zip(moe_layers, out.router_logits):
        ref[:, i] = torch.softmax(lg.float(), -1).topk(TOPK, dim=-1).indices.int()
    return ref


def test_engine_routed_experts_equal_hf_topk(moe_dir):
    eng = EmbeddedEngine(str(moe_dir), enable_return_routed_experts=True)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [3, 4, 5, 6, 7]]
    items = [GenItem(rid=f"r{i}", input_ids=p, max_new_tokens=6, temperature=1.0, seed=i, return_routed_experts=True,
                     ignore_eos=True) for i, p in enumerate(prompts)]
    items.append(GenItem(rid="s", input_ids=[10, 11, 12], max_new_tokens=4, temperature=0.0,
                         return_routed_experts=True, routed_experts_start_len=2))
    outs = eng.generate(items)
    for it, o in zip(items, outs):
        seq = it.input_ids + o["output_ids"]
        got = decode_routed_experts(o["meta_info"]["routed_experts"], LAYERS, TOPK)
        want = _hf_topk(moe_dir, seq)[: len(seq) - 1][it.routed_experts_start_len:]
        assert got.shape == (len(seq) - 1 - it.routed_experts_start_len, LAYERS, TOPK)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values), it.rid
        assert torch.equal(got, want), it.rid  # same order too: HF's topk order
    # without the request field nothing is returned
    plain = eng.generate([GenItem(rid="p", input_ids=[3, 4], max_new_tokens=2)])[0]
    assert "routed_experts" not in plain["meta_info"]


def test_routed_experts_refused_without_flag_or_moe(moe_dir, tmp_path):
    eng = EmbeddedEngine(str(moe_dir))
    with pytest.raises(RequestError, match="--enable-return-routed-experts"):
        eng.generate([GenItem(rid="x", input_ids=[1, 2], max_new_tokens=1, return_routed_experts=True)])
    on = EmbeddedEngine(str(moe_dir), enable_return_routed_experts=True)
    with pytest.raises(RequestError, match="routed_experts_start_len=3"):
        on.generate([GenItem(rid="x", input_ids=[1, 2], max_new_tokens=1, return_routed_experts=True,
                             routed_experts_start_len=3)])
    from tiny_hf import make_tiny_hf_model

    dense = tmp_path / "dense"
    make_tiny_hf_model(dense)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        EmbeddedEngine(str(dense), enable_return_routed_experts=True)


def test_client_requests_and_decodes_routed_experts_over_http(moe_dir, tmp_path):
    from rfpo_megatron.rollout import SamplingParams, launch_engine

    client = launch_engine({"backend": "embedded", "model_path": str(moe_dir), "log_dir": str(tmp_path),
                            "return_routed_experts": True})
    try:
        assert client.routed_experts_shape == (LAYERS, TOPK)
        body = client.build_generate_payloads([[3, 4, 5]], SamplingParams(n=2))[0][0]
        assert body["return_routed_experts"] is True
        out = client.generate([[3, 4, 5], [6, 7]], SamplingParams(n=2, max_new_tokens=5, seed=1, ignore_eos=True))
        for prompt, res in zip([[3, 4, 5], [6, 7]], out):
            for r in res:
                seq = prompt + r.output_ids
                assert r.routed_experts.dtype == torch.int32
                assert torch.equal(r.routed_experts, _hf_topk(moe_dir, seq)[: len(seq) - 1])
                assert "routed_experts" not in r.meta  # decoded, not kept twice
    finally:
        client.shutdown()


def test_sglang_server_args_accept_the_flag():
    """SGLang 0.5.23's own ServerArgs parser takes the launch line the launcher builds for R3."""
    import sglang_ref as R

    from rfpo_megatron.rollout.sglang import build_server_cmd

    if R.available():
        pytest.skip(R.available())
    cmd = build_server_cmd("/m", "127.0.0.1", 30000, 1, {"enable_return_routed_experts": True})
    assert "--enable-return-routed-experts" in cmd
    on, off = R.run("server_args", argvs=[cmd[cmd.index("--model-path"):], ["--model-path", "/m"]])
    assert on.get("error") is None, on
    assert on["enable_return_routed_experts"] is True and off["enable_return_routed_experts"] is False


def test_decode_names_a_shape_mismatch():
    from rfpo_megatron.rollout.base import encode_routed_experts

    x = torch.arange(2 * 3 * 2, dtype=torch.int32).reshape(2, 3, 2)
    s = encode_routed_experts(x)
    assert torch.equal(decode_routed_experts(s, 3, 2), x)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        decode_routed_experts(s, 5, 2)
    assert json.dumps(s)  # a plain JSON string, as SGLang's field
