"""Compare an HF-config `Arch` with the megatron-core architecture actually built; every mismatch names the field.

Used by the conversion tools (against `actor.model.transformer_config_from_hf`) and when weights are
loaded into a live model (against the model's own TransformerConfig and vocab).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rfpo_megatron.convert.arch import Arch, ConversionError

if TYPE_CHECKING:
    import torch


def config_diffs(arch: Arch, tconfig: Any) -> list[str]:
    """Mismatches between `arch` (from config.json) and a megatron TransformerConfig.

    Each entry reads "<hf field>=<value> but megatron <attr>=<value>".
    """
    nqg = tconfig.num_query_groups or tconfig.num_attention_heads
    kv_channels = tconfig.kv_channels or tconfig.hidden_size // tconfig.num_attention_heads
    act = getattr(tconfig.activation_func, "__name__", str(tconfig.activation_func))
    checks = [
        ("num_hidden_layers", arch.num_layers, "num_layers", tconfig.num_layers),
        ("hidden_size", arch.hidden_size, "hidden_size", tconfig.hidden_size),
        ("intermediate_size", arch.ffn_hidden_size, "ffn_hidden_size", tconfig.ffn_hidden_size),
        ("num_attention_heads", arch.num_heads, "num_attention_heads", tconfig.num_attention_heads),
        ("num_key_value_heads", arch.num_kv_heads, "num_query_groups", nqg),
        ("head_dim", arch.head_dim, "kv_channels", kv_channels),
        ("attention_bias (q/k/v bias)", arch.qkv_bias, "add_qkv_bias", bool(tconfig.add_qkv_bias or tconfig.add_bias_linear)),
        ("attention_bias (o_proj bias)", arch.o_bias, "add_bias_linear", bool(tconfig.add_bias_linear)),
        ("mlp_bias", arch.mlp_bias, "add_bias_linear", bool(tconfig.add_bias_linear)),
        ("model_type (q/k norm)", arch.qk_norm, "qk_layernorm", bool(tconfig.qk_layernorm)),
        ("rms_norm_eps", arch.rms_norm_eps, "layernorm_epsilon", tconfig.layernorm_epsilon),
        ("hidden_act (SwiGLU)", True, "gated_linear_unit", bool(tconfig.gated_linear_unit)),
        ("hidden_act", "silu", "activation_func", act),
        ("(RMSNorm)", "RMSNorm", "normalization", tconfig.normalization),
    ]
    n_exp = getattr(tconfig, "num_moe_experts", None) or 0
    checks.append(("num_experts", arch.num_experts, "num_moe_experts", n_exp))
    if arch.is_moe and n_exp:
        freq = tconfig.moe_layer_freq
        pattern = [1 if i % freq == 0 else 0 for i in range(tconfig.num_layers)] if isinstance(freq, int) else list(freq)
        checks += [
            ("num_experts_per_tok", arch.moe_topk, "moe_router_topk", tconfig.moe_router_topk),
            ("moe_intermediate_size", arch.moe_ffn_hidden_size, "moe_ffn_hidden_size", tconfig.moe_ffn_hidden_size),
            ("norm_topk_prob (softmax over the top-k)", arch.norm_topk_prob, "not moe_router_pre_softmax",
             not tconfig.moe_router_pre_softmax),
            ("decoder_sparse_step / mlp_only_layers (MoE layers)", list(arch.moe_layers), "moe_layer_freq",
             [i for i, f in enumerate(pattern) if f]),
            ("(softmax router)", "softmax", "moe_router_score_function", tconfig.moe_router_score_function),
            ("(no shared experts)", None, "moe_shared_expert_intermediate_size",
             tconfig.moe_shared_expert_intermediate_size),
        ]
    return [f"{hf}={a!r} but megatron {mc}={b!r}" for hf, a, mc, b in checks if a != b]


def expected_inv_freq(arch: Arch) -> "torch.Tensor":
    """RoPE inverse frequencies [head_dim/2] (float64) as HF computes them (default or llama3 scaling).

    ConversionError for other rope types (the check cannot vouch for them).
    """
    import math

    import torch

    d = arch.head_dim
    base = [1.0 / arch.rope_theta ** (2 * i / d) for i in range(d // 2)]
    if arch.rope_type == "default":
        return torch.tensor(base, dtype=torch.float64)
    if arch.rope_type != "llama3":
        raise ConversionError(f"rope_scaling.rope_type={arch.rope_type!r} is not supported (default or llama3)")
    p = dict(arch.rope_scaling)
    factor, low, high = float(p.get("factor", 8.0)), float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    orig = float(p.get("original_max_position_embeddings", 8192))
    out = []
    for f in base:
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(f)
        elif wavelen > orig / low:
            out.append(f / factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def rope_diffs(arch: Arch, model: Any) -> list[str]:
    """Compare the model's rotary inv_freq with the config's rope_theta / rope scaling (rtol 1e-5)."""
    rope = getattr(model, "rotary_pos_emb", None)
    inv = getattr(rope, "inv_freq", None)
    if inv is None:
        return ["the model has no rotary embedding (position_embedding_type must be 'rope')"]
    want = expected_inv_freq(arch)
    got = inv.detach().double().cpu().flatten()
    if got.shape != want.shape:
        return [f"head_dim={arch.head_dim} gives {want.numel()} rotary frequencies, the model has {got.numel()}"]
    rel = ((got - want).abs() / want.abs()).max().item()
    if rel > 1e-5:
        return [
            f"rope_theta={arch.rope_theta:g}, rope scaling {arch.rope_type!r} {dict(arch.rope_scaling) or ''}: the model's "
            f"rotary frequencies differ (max rel diff {rel:.2e}); megatron rotary_base/rope_scaling disagree with the config"
        ]
    return []


def model_diffs(arch: Arch, chunk: Any) -> list[str]:
    """`config_diffs` plus rope, vocab size and embedding tying of a live GPTModel chunk."""
    from rfpo_megatron.convert.sharding import unwrap

    model = unwrap(chunk)
    diffs = config_diffs(arch, model.config) + rope_diffs(arch, model)
    vocab = getattr(model, "vocab_size_unpadded", None)
    if vocab is not None and vocab != arch.vocab_size:
        diffs.append(f"vocab_size={arch.vocab_size} but the model was built with vocab_size={vocab}")
    if vocab is None and getattr(model, "vocab_size", arch.vocab_size) < arch.vocab_size:
        diffs.append(f"vocab_size={arch.vocab_size} exceeds the model's padded vocab {model.vocab_size}")
    tie = bool(getattr(model, "share_embeddings_and_output_weights", arch.tie_embeddings))
    if tie != arch.tie_embeddings:
        diffs.append(f"tie_word_embeddings={arch.tie_embeddings} but megatron share_embeddings_and_output_weights={tie}")
    return diffs


def require_no_diffs(diffs: list[str], *, what: str) -> None:
    """Raise ConversionError listing `diffs` (each names a field) unless empty."""
    if diffs:
        raise ConversionError(f"{what}:\n  - " + "\n  - ".join(diffs))
