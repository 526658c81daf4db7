"""rollout.lean_decode.LeanDecoder against HF transformers' own forward: Qwen2 (q/k/v bias), Llama (no bias,
untied head), Qwen3 (per-head q/k norms) — every decode step's logits equal HF's cached forward of the same
rows (left-padded prompts of different lengths, GQA), rows dropped mid-way, the fused q/k/v / gate-up weights
rebuilt after an in-place weight update; MoE keeps HF's path; the engine's lean and HF paths sample the same
tokens from the same seeds."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from rfpo_megatron.rollout.embedded import EmbeddedEngine, GenItem
from rfpo_megatron.rollout.lean_decode import LeanDecoder, unsupported_reason

torch.set_num_threads(1)


def _model(kind: str):
    import transformers as T

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed({"qwen2": 0, "llama": 1, "qwen3": 2}[kind])
    if kind == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(**common, tie_word_embeddings=True))
    elif kind == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0))
    else:
        m = T.Qwen3ForCausalLM(T.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True))
    with torch.no_grad():  # non-zero biases / norm weights so every term matters
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m.float().eval()


def _prefill(model, prompts):
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    return out.logits[:, -1], cache, mask, pos


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_every_step_equals_hf_cached_forward(kind):
    model = _model(kind)
    assert unsupported_reason(model) is None
    prompts = [[5, 9, 33, 2, 7], [7, 8], [11, 12, 13, 14, 15, 16, 17, 18], [42]]
    _, hf_cache, mask, pos = _prefill(model, prompts)
    _, lean_cache, _, _ = _prefill(model, prompts)
    lean = LeanDecoder(model, lean_cache, mask, capacity=mask.shape[1] + 10)
    g = torch.Generator().manual_seed(0)
    hf_mask, p = mask.clone(), pos[:, -1] + 1
    rows = torch.arange(len(prompts))
    worst = 0.0
    for step in range(8):
        tok = torch.randint(0, 97, (len(rows),), generator=g)
        if step == 4:  # drop row 1 from both caches, as the engine does with finished samples
            keep = torch.tensor([0, 2, 3])
            hf_cache.batch_select_indices(keep)
            lean.select(keep)
            hf_mask, p, rows, tok = hf_mask[keep], p[keep], rows[keep], tok[keep]
        hf_mask = torch.cat([hf_mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
        with torch.no_grad():
            want = model(input_ids=tok[:, None], attention_mask=hf_mask, position_ids=p[:, None], past_key_values=hf_cache,
                         use_cache=True).logits[:, -1]
        got = lean.step(tok, p)
        worst = max(worst, float((got - want).abs().max()))
        p = p + 1
    assert worst <= 2e-5, worst  # float32 round-off of the same arithmetic (logits are O(1))


def test_fused_weights_follow_an_in_place_update():
    model = _model("qwen2")
    prompts = [[3, 4, 5], [6]]
    _, cache, mask, pos = _prefill(model, prompts)
    lean = LeanDecoder(model, cache, mask, capacity=mask.shape[1] + 4)
    tok, p = torch.tensor([1, 2]), pos[:, -1] + 1
    lean.step(tok, p)  # builds the stacked q/k/v and gate/up weights
    with torch.no_grad():  # what EmbeddedEngine.load_named_tensors does
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.copy_(torch.randn_like(layer.self_attn.k_proj.weight))
            layer.mlp.up_proj.weight.mul_(1.5)
    _, hf_cache, _, _ = _prefill(model, prompts)  # a new batch after the update: the model's stacked weights are stale
    lean2 = LeanDecoder(model, hf_cache, mask, capacity=mask.shape[1] + 4)
    _, ref_cache, _, _ = _prefill(model, prompts)
    with torch.no_grad():
        want = model(input_ids=tok[:, None], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                     position_ids=p[:, None], past_key_values=ref_cache, use_cache=True).logits[:, -1]
    assert float((lean2.step(tok, p) - want).abs().max()) <= 2e-5


def test_moe_keeps_hf_path_and_engine_paths_sample_the_same_tokens(tmp_path):
    from tiny_hf import make_tiny_hf_model, make_tiny_moe

    from transformers import AutoModelForCausalLM

    assert "qwen3_moe" in unsupported_reason(AutoModelForCausalLM.from_pretrained(make_tiny_moe(tmp_path / "moe")))
    assert EmbeddedEngine(make_tiny_moe(tmp_path / "moe2")).decode_path.startswith("hf")
    path = make_tiny_hf_model(tmp_path / "dense", seed=3)
    lean, hf = EmbeddedEngine(str(path)), EmbeddedEngine(str(path), lean_decode=False)
    assert lean.decode_path == "lean" and hf.decode_path.startswith("hf")
    items = lambda: [GenItem(rid=f"r{i}", input_ids=p, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=10 + i,  # noqa: E731
                             return_logprob=True) for i, p in enumerate([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]] * 2)]
    a, b = lean.generate(items()), hf.generate(items())
    for x, y in zip(a, b):
        assert x["output_ids"] == y["output_ids"]
        lx = [v[0] for v in x["meta_info"]["output_token_logprobs"]]
        ly = [v[0] for v in y["meta_info"]["output_token_logprobs"]]
        assert max(abs(u - v) for u, v in zip(lx, ly)) <= 1e-5
