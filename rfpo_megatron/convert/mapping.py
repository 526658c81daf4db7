"""HF ⇄ megatron-core parameter names and shapes for Qwen2/2.5, Llama-3 and Qwen3 dense: the one mapping.

Megatron names here are the *canonical* ones: megatron-core's GPTModel with the local layer spec,
TP = 1, GLOBAL layer numbering (0-based), vocab UNPADDED. TP sharding, vocab padding, PP layer
renumbering and TE's fused-layernorm names are handled in `sharding.py`.

Each megatron parameter comes from one or more HF tensors through one `Rule`:

- ``copy``: same tensor (layernorms, o_proj/down_proj, embeddings, lm_head).
- ``qkv``:  q [nq·d, *], k [ng·d, *], v [ng·d, *]  →  linear_qkv [ng·(nq/ng + 2)·d, *], megatron's GQA
  group interleave: for each KV group g the rows are (q heads of g, k_g, v_g).
- ``glu``:  gate [F, h], up [F, h]  →  linear_fc1 [2F, h] = cat(gate, up) (at TP = 1).

MoE layers (Qwen3-MoE) replace the MLP by a router and experts in megatron's SequentialMLP layout with
GLOBAL expert numbers e (the EP rank's local expert k is e = ep_rank · E/EP + k, see `sharding.py`):
``mlp.router.weight`` [E, h] ← ``mlp.gate.weight``; ``mlp.experts.local_experts.{e}.linear_fc1.weight``
[2F_e, h] ← ``mlp.experts.{e}.gate_proj/up_proj.weight`` (glu); ``…linear_fc2.weight`` [h, F_e] ←
``mlp.experts.{e}.down_proj.weight``. The HF names are the checkpoint's (and SGLang's) per-expert names, not
transformers 5's fused in-memory ``experts.gate_up_proj``.

HF → megatron is many-to-one and megatron → HF is one-to-many, so export can stream parameter by
parameter (`mcore_to_hf_tensors`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch

from rfpo_megatron.convert.arch import Arch, ConversionError

LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class Rule:
    """One megatron parameter and the HF tensors it is built from.

    mcore: canonical megatron name; hf: HF names (3 for qkv, 2 for glu, else 1); kind: copy|qkv|glu;
    mcore_shape / hf_shapes: expected full unpadded shapes; fields: HF config fields that set the shapes.
    """

    mcore: str
    hf: tuple[str, ...]
    kind: str
    mcore_shape: tuple[int, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    fields: str


def layer_rules(arch: Arch, i: int) -> list[Rule]:
    """The rules of decoder layer `i` (global, 0-based)."""
    h, d, F = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    m, p = f"{LAYER_PREFIX}{i}.", f"model.layers.{i}."
    qf = "num_attention_heads × head_dim, hidden_size"
    kvf = "num_key_value_heads × head_dim, hidden_size"
    rules = [
        Rule(m + "input_layernorm.weight", (p + "input_layernorm.weight",), "copy", (h,), ((h,),), "hidden_size"),
        Rule(
            m + "self_attention.linear_qkv.weight",
            tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"),
            "qkv",
            (arch.qkv_rows, h),
            ((arch.q_rows, h), (arch.kv_rows, h), (arch.kv_rows, h)),
            f"{qf} / {kvf}",
        ),
    ]
    if arch.qkv_bias:
        rules.append(
            Rule(
                m + "self_attention.linear_qkv.bias",
                tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv"),
                "qkv",
                (arch.qkv_rows,),
                ((arch.q_rows,), (arch.kv_rows,), (arch.kv_rows,)),
                "num_attention_heads × head_dim / num_key_value_heads × head_dim",
            )
        )
    if arch.qk_norm:
        for mx, hx in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
            rules.append(
                Rule(m + f"self_attention.{mx}.weight", (p + f"self_attn.{hx}.weight",), "copy", (d,), ((d,),), "head_dim")
            )
    rules.append(
        Rule(
            m + "self_attention.linear_proj.weight",
            (p + "self_attn.o_proj.weight",),
            "copy",
            (h, arch.q_rows),
            ((h, arch.q_rows),),
            "hidden_size, num_attention_heads × head_dim",
        )
    )
    if arch.o_bias:
        rules.append(
            Rule(m + "self_attention.linear_proj.bias", (p + "self_attn.o_proj.bias",), "copy", (h,), ((h,),), "hidden_size")
        )
    rules.append(
        Rule(m + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",), "copy", (h,), ((h,),), "hidden_size")
    )
    if arch.is_moe_layer(i):
        return rules + moe_mlp_rules(arch, i)
    rules.append(
        Rule(
            m + "mlp.linear_fc1.weight",
            (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            "glu",
            (2 * F, h),
            ((F, h), (F, h)),
            "intermediate_size, hidden_size",
        )
    )
    if arch.mlp_bias:
        rules.append(
            Rule(
                m + "mlp.linear_fc1.bias",
                (p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"),
                "glu",
                (2 * F,),
                ((F,), (F,)),
                "intermediate_size",
            )
        )
    rules.append(
        Rule(m + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), "copy", (h, F), ((h, F),), "hidden_size, intermediate_size")
    )
    if arch.mlp_bias:
        rules.append(Rule(m + "mlp.linear_fc2.bias", (p + "mlp.down_proj.bias",), "copy", (h,), ((h,),), "hidden_size"))
    return rules


EXPERT_PREFIX = "mlp.experts.local_experts."


def moe_mlp_rules(arch: Arch, i: int) -> list[Rule]:
    """Router and expert rules of MoE layer `i` (global layer, global expert numbers)."""
    h, E, F = arch.hidden_size, arch.num_experts, arch.moe_ffn_hidden_size
    m, p = f"{LAYER_PREFIX}{i}.", f"model.layers.{i}."
    rules = [Rule(m + "mlp.router.weight", (p + "mlp.gate.weight",), "copy", (E, h), ((E, h),),
                  "num_experts, hidden_size")]
    for e in range(E):
        me, pe = m + f"{EXPERT_PREFIX}{e}.", p + f"mlp.experts.{e}."
        rules.append(Rule(me + "linear_fc1.weight", (pe + "gate_proj.weight", pe + "up_proj.weight"), "glu",
                          (2 * F, h), ((F, h), (F, h)), "moe_intermediate_size, hidden_size"))
        rules.append(Rule(me + "linear_fc2.weight", (pe + "down_proj.weight",), "copy", (h, F), ((h, F),),
                          "hidden_size, moe_intermediate_size"))
    return rules


def embedding_rule(arch: Arch) -> Rule:
    v, h = arch.vocab_size, arch.hidden_size
    return Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy", (v, h), ((v, h),), "vocab_size, hidden_size")


def final_norm_rule(arch: Arch) -> Rule:
    h = arch.hidden_size
    return Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", (h,), ((h,),), "hidden_size")


def output_rule(arch: Arch) -> Rule | None:
    """lm_head ⇄ output_layer; None when embeddings are tied (HF then has no lm_head tensor)."""
    if arch.tie_embeddings:
        return None
    v, h = arch.vocab_size, arch.hidden_size
    return Rule("output_layer.weight", ("lm_head.weight",), "copy", (v, h), ((v, h),), "vocab_size, hidden_size")


def all_rules(arch: Arch, layers: Iterable[int] | None = None, *, first: bool = True, last: bool = True) -> list[Rule]:
    """Rules of a PP stage: embedding if `first`, the given global layers, final norm + head if `last`."""
    rules = [embedding_rule(arch)] if first else []
    for i in range(arch.num_layers) if layers is None else layers:
        rules += layer_rules(arch, i)
    if last:
        rules.append(final_norm_rule(arch))
        out = output_rule(arch)
        if out is not None:
            rules.append(out)
    return rules


def rule_for_mcore(arch: Arch, name: str) -> Rule:
    """The rule of one canonical megatron name; ConversionError for a name the family does not have."""
    if name.startswith(LAYER_PREFIX):
        i = int(name[len(LAYER_PREFIX):].split(".", 1)[0])
        candidates = layer_rules(arch, i) if 0 <= i < arch.num_layers else []
    else:
        candidates = [embedding_rule(arch), final_norm_rule(arch)] + [r for r in [output_rule(arch)] if r]
    for rule in candidates:
        if rule.mcore == name:
            return rule
    raise ConversionError(f"unknown megatron tensor '{name}' for a {arch.model_type} model with this config")


# ---- tensor transforms ---------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """q [nq·d, *], k [ng·d, *], v [ng·d, *] → [ng·(nq/ng + 2)·d, *] grouped (q heads of g, k_g, v_g)."""
    ng, rest = num_kv_heads, tuple(q.shape[1:])
    per = num_heads // ng
    d = k.shape[0] // ng
    q4 = q.reshape(ng, per * d, *rest)
    k4 = k.reshape(ng, d, *rest)
    v4 = v.reshape(ng, d, *rest)
    return torch.cat([q4, k4, v4], dim=1).reshape(ng * (per + 2) * d, *rest).contiguous()


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Inverse of `fuse_qkv`: [ng·(nq/ng + 2)·d, *] → q [nq·d, *], k [ng·d, *], v [ng·d, *]."""
    ng, d, rest = num_kv_heads, head_dim, tuple(qkv.shape[1:])
    per = num_heads // ng
    g = qkv.reshape(ng, (per + 2) * d, *rest)
    q = g[:, : per * d].reshape(num_heads * d, *rest).contiguous()
    k = g[:, per * d : (per + 1) * d].reshape(ng * d, *rest).contiguous()
    v = g[:, (per + 1) * d :].reshape(ng * d, *rest).contiguous()
    return q, k, v


def hf_to_mcore_tensor(arch: Arch, rule: Rule, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Build the full (TP = 1, unpadded) megatron tensor of `rule` from its HF tensors (in rule.hf order)."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "qkv":
        return fuse_qkv(*tensors, arch.num_heads, arch.num_kv_heads)
    if rule.kind == "glu":
        return torch.cat(tensors, dim=0).contiguous()
    raise AssertionError(rule.kind)


def mcore_to_hf_tensors(arch: Arch, rule: Rule, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Split one full (TP = 1, unpadded) megatron tensor into its HF (name, tensor) pairs."""
    if tuple(tensor.shape) != rule.mcore_shape:
        raise ConversionError(
            f"megatron tensor '{rule.mcore}' has shape {list(tensor.shape)}, expected {list(rule.mcore_shape)} "
            f"from config fields ({rule.fields})"
        )
    if rule.kind == "copy":
        parts = [tensor]
    elif rule.kind == "qkv":
        parts = list(split_qkv(tensor, arch.num_heads, arch.num_kv_heads, arch.head_dim))
    elif rule.kind == "glu":
        parts = [p.contiguous() for p in torch.chunk(tensor, 2, dim=0)]
    else:
        raise AssertionError(rule.kind)
    return list(zip(rule.hf, parts))


# ---- whole-state validation and conversion --------------------------------------------------------

# HF tensors that are buffers, not weights: reported and skipped, never converted.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def check_hf_tensors(arch: Arch, shapes: Mapping[str, tuple[int, ...]], *, source: str = "checkpoint") -> list[str]:
    """Compare HF tensor names/shapes with what `arch` expects; raise ConversionError listing every problem.

    shapes: HF name -> shape (read from safetensors headers, nothing loaded). A tied model whose file
    also carries `lm_head.weight` is accepted (it is checked for equality when loaded). Returns the
    names ignored as non-parameter buffers.
    """
    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    for rule in all_rules(arch):
        for name, shape in zip(rule.hf, rule.hf_shapes):
            expected[name] = (shape, rule.fields)
    problems: list[str] = []
    ignored = [n for n in shapes if n.endswith(IGNORED_HF_SUFFIXES)]
    tied_head = arch.tie_embeddings and "lm_head.weight" in shapes
    missing = sorted(n for n in expected if n not in shapes)
    unknown = sorted(n for n in shapes if n not in expected and n not in ignored and not (tied_head and n == "lm_head.weight"))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:12])}{' …' if len(missing) > 12 else ''}")
    if unknown:
        problems.append(f"unknown tensors ({len(unknown)}): {', '.join(unknown[:12])}{' …' if len(unknown) > 12 else ''}")
    for name, (shape, fields) in expected.items():
        if name in shapes and tuple(shapes[name]) != tuple(shape):
            problems.append(
                f"tensor '{name}' has shape {list(shapes[name])} but config.json implies {list(shape)} "
                f"({fields}{_field_values(arch, fields)})"
            )
    if tied_head and tuple(shapes["lm_head.weight"]) != (arch.vocab_size, arch.hidden_size):
        problems.append(f"tensor 'lm_head.weight' has shape {list(shapes['lm_head.weight'])} (tied model)")
    if problems:
        raise ConversionError(f"{source} does not match its {arch.model_type} config:\n  - " + "\n  - ".join(problems))
    return ignored


def _field_values(arch: Arch, fields: str) -> str:
    vals = {
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "moe_intermediate_size": arch.moe_ffn_hidden_size,
        "num_experts": arch.num_experts,
        "vocab_size": arch.vocab_size,
    }
    named = set(re.findall(r"[a-z_]+", fields))
    used = [f"{k}={v}" for k, v in vals.items() if k in named]
    return "; " + ", ".join(used) if used else ""


def hf_to_mcore_state(
    arch: Arch, get_hf: Callable[[str], torch.Tensor], rules: Iterable[Rule]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical megatron name, full unpadded tensor) for `rules`, reading HF tensors lazily via get_hf."""
    for rule in rules:
        tensors = [get_hf(n) for n in rule.hf]
        for n, t, s in zip(rule.hf, tensors, rule.hf_shapes):
            if tuple(t.shape) != s:
                raise ConversionError(f"tensor '{n}' has shape {list(t.shape)}, expected {list(s)} ({rule.fields})")
        yield rule.mcore, hf_to_mcore_tensor(arch, rule, tensors)


def mcore_to_hf_state(arch: Arch, mcore_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full canonical megatron state (any subset of stages) → HF-named tensors; unknown names raise."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in mcore_state.items():
        rule = rule_or_tied_head(arch, name)
        if rule is None:
            continue
        out.update(mcore_to_hf_tensors(arch, rule, tensor))
    return out


def rule_or_tied_head(arch: Arch, name: str) -> Rule | None:
    """Rule of `name`; None for the duplicate output_layer.weight a tied model holds on the last PP stage."""
    if name == "output_layer.weight" and arch.tie_embeddings:
        return None
    return rule_for_mcore(arch, name)
