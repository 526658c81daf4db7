"""Test helper: tiny HF causal-LM directories built from a config (no downloads); used by the rollout and MoE tests.
(Moved here from rfpo_megatron/rollout/testing.py: the package itself never used it.)"""
from __future__ import annotations

from pathlib import Path


def make_tiny_hf_model(path: str | Path, seed: int = 0, vocab_size: int = 300, hidden_size: int = 64,
                       num_layers: int = 2, max_positions: int = 1024, eos_token_id: int = 2,
                       tie_word_embeddings: bool = False) -> Path:
    """Save a randomly initialised Qwen2 causal LM (fp32 safetensors) under `path`; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, eos_token_id=eos_token_id, pad_token_id=0,
                      bos_token_id=1, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # larger-than-default init so that distributions are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    path = Path(path)
    model.save_pretrained(path)
    return path


# tiny Qwen3-MoE (the shape of Qwen3-30B-A3B, scaled down): 4 layers, layer 1 dense, 4 experts, top-2
MOE_HF = dict(
    model_type="qwen3_moe",
    architectures=["Qwen3MoeForCausalLM"],
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
    router_aux_loss_coef=0.01,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def make_tiny_moe(path, cfg: dict = MOE_HF, seed: int = 0) -> str:
    """Save a random tiny Qwen3MoeForCausalLM under `path` (weights ~N(0, 0.15) so routing is far from uniform)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"})).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path)
    return str(path)
