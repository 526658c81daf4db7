"""Test helper: tiny HF causal-LM directories built from a config (no downloads); used by the rollout tests.
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
