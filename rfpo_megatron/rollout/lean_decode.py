"""Lean decode step for the embedded engine: one new token per row through an HF Llama-family model's own
weights (Qwen2, Llama, Qwen3 dense), without HF's per-module Python layers.

For a tiny model a decode step is Python overhead, not arithmetic: HF's forward walks ~60 modules, decorators,
mask builders and cache objects per step. `LeanDecoder` runs the same arithmetic as HF's eager path —
RMSNorm in fp32 then the weight, q/k/v projections (+ bias), Qwen3's per-head q/k norms, RoPE from the model's
own `rotary_emb` module, GQA attention with the scaling and the additive mask, softmax in fp32, o-projection,
SiLU-gated MLP, final norm, lm_head — as plain torch calls over a preallocated KV cache, so its logits equal
HF's forward to float32 round-off (tests/test_rollout_lean_decode.py). The prefill stays HF's own forward;
its cache is copied in. Models it does not cover (MoE, sliding windows, other activations) keep the HF path.

Shapes: B rows, H query heads, Hk key/value heads, D head dim, C cache capacity (prompt + max new tokens).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

SUPPORTED = ("qwen2", "llama", "qwen3")


def unsupported_reason(model: Any) -> Optional[str]:
    """None when LeanDecoder covers `model` (an HF causal LM), else why not (the engine then uses HF's forward)."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        return f"model_type {mt!r} not in {SUPPORTED}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "non-full attention layers"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return "no model.layers / model.rotary_emb"
    for layer in inner.layers:
        if not all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "a layer without a gated MLP (mixture of experts?)"
    return None


def _rms(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """HF's RMSNorm: normalise in float32, cast back, times the weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cache_tensors(cache: Any, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) [B, Hk, T, D] per layer of an HF DynamicCache: transformers >= 5 (`cache.layers[i].keys`)
    or 4.x (`cache.key_cache[i]`)."""
    if hasattr(cache, "layers"):
        return [(cache.layers[i].keys, cache.layers[i].values) for i in range(n_layers)]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(n_layers)]


def _fused(cache: dict, key: tuple, linears: tuple) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weights (and biases) of `linears` stacked along the output dim, rebuilt only when one of them changed
    (a weight update copies in place and bumps the tensor's version; a resume replaces the tensor)."""
    stamp = tuple((m.weight.data_ptr(), m.weight._version, None if m.bias is None else (m.bias.data_ptr(), m.bias._version))
                  for m in linears)
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        w = torch.cat([m.weight for m in linears], 0)
        b = None if all(m.bias is None for m in linears) else torch.cat(
            [m.bias if m.bias is not None else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device)
             for m in linears])
        hit = cache[key] = (stamp, w, b)
    return hit[1], hit[2]


class LeanDecoder:
    """KV cache [layers][B, Hk, C, D] (keys, values) + a validity mask [B, C] for one decode batch.

    q/k/v and gate/up run as one GEMM each (their weights stacked, cached on the model across batches and
    rebuilt after a weight update): tiny GEMMs cost their call, not their FLOPs."""

    def __init__(self, model: Any, hf_cache: Any, mask: torch.Tensor, capacity: int):
        """Take over HF's prefill cache (DynamicCache of the prompt, [B, Hk, T, D] per layer) and the prompt's
        attention mask [B, T] (1 = real token, left padding 0); room for `capacity` positions in all."""
        self.model = model
        inner = model.model
        self.layers = list(inner.layers)
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm
        self.embed = inner.embed_tokens
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        T = int(mask.shape[1])
        kv = _cache_tensors(hf_cache, len(self.layers))
        first = kv[0][0]
        B, Hk, D = int(first.shape[0]), int(first.shape[1]), int(first.shape[3])
        self.n_kv = Hk
        self.keys, self.values = [], []
        for i in range(len(self.layers)):
            k = torch.zeros(B, Hk, capacity, D, dtype=first.dtype, device=first.device)
            v = torch.zeros_like(k)
            k[:, :, :T] = kv[i][0]
            v[:, :, :T] = kv[i][1]
            self.keys.append(k)
            self.values.append(v)
        self.fused = model.__dict__.setdefault("_rfpo_lean_fused", {})  # (layer, "qkv"|"gate_up") -> stacked weights
        self.valid = torch.zeros(B, capacity, dtype=torch.bool, device=first.device)
        self.valid[:, :T] = mask.to(torch.bool)
        self.length = T

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the current batch) of the cache."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.valid = self.valid.index_select(0, rows)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B] (the last sampled ids), positions [B] (their position ids) -> next-token logits [B, V]."""
        B, t = tokens.shape[0], self.length
        if t >= self.keys[0].shape[2]:
            raise RuntimeError(f"lean decode cache full ({t} positions): size it for prompt + max_new_tokens")
        self.valid[:, t] = True
        x = self.embed(tokens[:, None])  # [B, 1, hidden]
        cos, sin = self.rotary(x, positions[:, None])  # [B, 1, D]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, D], broadcast over heads
        neg = torch.finfo(x.dtype).min
        bias = torch.zeros(B, 1, 1, t + 1, dtype=x.dtype, device=x.device).masked_fill_(
            ~self.valid[:, None, None, :t + 1], neg)  # additive mask over [0, t]
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            h = _rms(x, layer.input_layernorm)
            w, b = _fused(self.fused, (i, "qkv"), (a.q_proj, a.k_proj, a.v_proj))
            nq, nk = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
            q, k, v = F.linear(h, w, b).split([nq, nk, nk], dim=-1)
            q = q.reshape(B, 1, -1, self.head_dim).transpose(1, 2)
            k = k.reshape(B, 1, -1, self.head_dim).transpose(1, 2)
            v = v.reshape(B, 1, -1, self.head_dim).transpose(1, 2)
            if getattr(a, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm of q and k before RoPE
                q, k = _rms(q, a.q_norm), _rms(k, a.k_norm)
            q = q * cos + _rotate_half(q) * sin  # [B, H, 1, D]
            k = k * cos + _rotate_half(k) * sin  # [B, Hk, 1, D]
            self.keys[i][:, :, t:t + 1] = k
            self.values[i][:, :, t:t + 1] = v
            K, V = self.keys[i][:, :, :t + 1], self.values[i][:, :, :t + 1]  # [B, Hk, t+1, D]
            g = q.shape[1] // self.n_kv
            qg = q.view(B, self.n_kv, g, self.head_dim)  # query heads grouped by their key/value head
            scores = torch.matmul(qg, K.transpose(2, 3)) * self.scaling + bias  # [B, Hk, g, t+1]
            p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            o = torch.matmul(p, V).reshape(B, 1, -1)  # [B, 1, H*D]
            x = x + F.linear(o, a.o_proj.weight, a.o_proj.bias)
            h = _rms(x, layer.post_attention_layernorm)
            m = layer.mlp
            w, b = _fused(self.fused, (i, "gate_up"), (m.gate_proj, m.up_proj))
            gate, up = F.linear(h, w, b).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, m.down_proj.weight, m.down_proj.bias)
        self.length = t + 1
        return F.linear(_rms(x, self.final_norm), self.lm_head.weight, self.lm_head.bias)[:, 0]
