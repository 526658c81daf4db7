"""The architecture of a dense decoder read from an HF config: one validated record per model family.

`Arch` is what every conversion step checks shapes against. It is derived only from the HF
`config.json` (a dict or a `transformers.PretrainedConfig`), and every attribute remembers the
config field it came from, so that a mismatch names the field to fix.

Supported families (HF `model_type`): `qwen2` (Qwen2 / Qwen2.5), `llama` (Llama-3), `qwen3` (dense) and
`qwen3_moe` (Qwen3-MoE, e.g. Qwen3-30B-A3B: top-k softmax router, no shared experts; the MoE layers follow
`decoder_sparse_step` / `mlp_only_layers`, the other layers are dense SwiGLU MLPs of `intermediate_size`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3", "qwen3_moe")
MOE_MODEL_TYPES = ("qwen3_moe",)

# Arch attribute -> HF config field (for error messages).
FIELD_OF = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
    "tie_embeddings": "tie_word_embeddings",
    "qkv_bias": "attention_bias",
    "o_bias": "attention_bias",
    "mlp_bias": "mlp_bias",
    "qk_norm": "model_type",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling / rope_parameters",
    "num_experts": "num_experts",
    "moe_topk": "num_experts_per_tok",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "norm_topk_prob": "norm_topk_prob",
    "moe_layers": "decoder_sparse_step / mlp_only_layers",
}


class ConversionError(ValueError):
    """A user-fixable conversion problem (config, tensor names/shapes, paths); the message names it."""


@dataclass(frozen=True)
class Arch:
    """Shapes and switches of a GPT-style decoder (all sizes unpadded, TP = 1; MoE fields 0/() when dense)."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs; () = plain rope
    num_experts: int = 0  # routed experts per MoE layer (0: dense model)
    moe_topk: int = 0  # experts per token (num_experts_per_tok)
    moe_ffn_hidden_size: int = 0  # one expert's SwiGLU width (moe_intermediate_size)
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to 1
    moe_layers: tuple[int, ...] = ()  # global 0-based indices of the MoE layers (the rest are dense)
    router_aux_loss_coef: float = 0.0  # the config's load-balancing coefficient (a training default, not a shape)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers

    @property
    def rope_type(self) -> str:
        return str(dict(self.rope_scaling).get("rope_type", "default"))

    @property
    def q_rows(self) -> int:
        """Rows of q_proj: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        """Rows of k_proj (= v_proj): num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_rows(self) -> int:
        """Rows of megatron's fused linear_qkv: ng * (nq/ng + 2) * head_dim."""
        return self.q_rows + 2 * self.kv_rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hf_config_dict(hf_config: Any) -> dict[str, Any]:
    """A plain dict of an HF config given as a dict or a `transformers.PretrainedConfig` (its `to_dict()`)."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ConversionError(f"hf_config must be a dict or a transformers config, got {type(hf_config).__name__}")


def rope_theta_of(cfg: Mapping[str, Any]) -> float:
    """rope θ from `rope_theta` (transformers 4.x) or `rope_parameters.rope_theta` (5.x); default 10000."""
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, Mapping) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return 10000.0


def rope_scaling_of(cfg: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """RoPE scaling from `rope_scaling` (config.json / transformers 4.x) or `rope_parameters` (5.x).

    Returns sorted (key, value) pairs without rope_theta; () when the rope type is default/absent.
    """
    for key in ("rope_scaling", "rope_parameters"):
        params = cfg.get(key)
        if isinstance(params, Mapping) and params:
            params = dict(params)
            kind = params.get("rope_type", params.get("type", "default"))
            if kind in (None, "default"):
                return ()
            params["rope_type"] = kind
            params.pop("type", None)
            params.pop("rope_theta", None)
            return tuple(sorted(params.items()))
    return ()


def _int_field(cfg: Mapping[str, Any], name: str, where: str) -> int:
    value = cfg.get(name)
    if value is None:
        raise ConversionError(f"{where}: field '{name}' is missing; add it to config.json")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f"{where}: field '{name}' must be a positive integer, got {value!r}")
    return value


def arch_from_hf_config(hf_config: Any, *, where: str = "config.json") -> Arch:
    """Validate an HF config of a supported family and return its `Arch`.

    Raises ConversionError naming the field for unsupported families, missing/invalid fields,
    head counts that do not divide, and bias combinations megatron-core cannot express.
    """
    cfg = hf_config_dict(hf_config)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{where}: unsupported HF model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(dense Qwen2/2.5, Llama-3, Qwen3)"
        )
    if model_type not in MOE_MODEL_TYPES:
        for moe_field in ("num_experts", "num_local_experts"):
            if cfg.get(moe_field):
                raise ConversionError(
                    f"{where}: field '{moe_field}'={cfg[moe_field]}: experts (MoE) are not supported for "
                    f"model_type={model_type!r}; MoE is supported for {', '.join(MOE_MODEL_TYPES)}"
                )
    n_layers = _int_field(cfg, "num_hidden_layers", where)
    hidden = _int_field(cfg, "hidden_size", where)
    ffn = _int_field(cfg, "intermediate_size", where)
    nq = _int_field(cfg, "num_attention_heads", where)
    vocab = _int_field(cfg, "vocab_size", where)
    nkv = cfg.get("num_key_value_heads")
    nkv = nq if nkv is None else _int_field(cfg, "num_key_value_heads", where)
    if nq % nkv:
        raise ConversionError(
            f"{where}: field 'num_key_value_heads'={nkv} must divide 'num_attention_heads'={nq}"
        )
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % nq:
            raise ConversionError(
                f"{where}: 'hidden_size'={hidden} is not divisible by 'num_attention_heads'={nq}; set 'head_dim'"
            )
        head_dim = hidden // nq
    else:
        head_dim = _int_field(cfg, "head_dim", where)
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"{where}: field hidden_act={act!r} is not supported; only SwiGLU ('silu') is")
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias, qk_norm = True, False, False, False
    else:
        attn_bias = bool(cfg.get("attention_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ConversionError(
                f"{where}: 'attention_bias'={attn_bias} with 'mlp_bias'={mlp_bias} is not expressible in "
                "megatron-core (add_bias_linear puts biases on all linear layers or none)"
            )
        qkv_bias = o_bias = attn_bias
        qk_norm = model_type in ("qwen3", "qwen3_moe")
    eps = cfg.get("rms_norm_eps", 1e-6)
    moe = _moe_fields(cfg, n_layers, where) if model_type in MOE_MODEL_TYPES else {}
    return Arch(
        model_type=model_type,
        num_layers=n_layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_heads=nq,
        num_kv_heads=nkv,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=qk_norm,
        rms_norm_eps=float(eps),
        rope_theta=rope_theta_of(cfg),
        rope_scaling=rope_scaling_of(cfg),
        **moe,
    )


def _moe_fields(cfg: Mapping[str, Any], n_layers: int, where: str) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE config; ConversionError naming the field for what megatron cannot express."""
    e_field = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
    n_exp = _int_field(cfg, e_field, where)
    topk = _int_field(cfg, "num_experts_per_tok", where)
    if topk > n_exp:
        raise ConversionError(f"{where}: field 'num_experts_per_tok'={topk} exceeds '{e_field}'={n_exp}")
    ffn = _int_field(cfg, "moe_intermediate_size", where)
    for shared in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
        if cfg.get(shared):
            raise ConversionError(f"{where}: field '{shared}'={cfg[shared]}: shared experts are not supported "
                                  "for qwen3_moe (Qwen3-MoE has none)")
    # absent or null = 1 (Qwen3MoeConfig's default: every layer MoE unless in mlp_only_layers)
    step = 1 if cfg.get("decoder_sparse_step") is None else _int_field(cfg, "decoder_sparse_step", where)
    dense_only = cfg.get("mlp_only_layers") or []
    if not isinstance(dense_only, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers for i in dense_only):
        raise ConversionError(f"{where}: field 'mlp_only_layers'={dense_only!r} must list layer indices in "
                              f"[0, num_hidden_layers={n_layers})")
    layers = tuple(i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0)
    if not layers:
        raise ConversionError(f"{where}: 'decoder_sparse_step'={step} with 'mlp_only_layers'={list(dense_only)} "
                              "leaves no MoE layer; use a dense config (model_type 'qwen3') instead")
    if cfg.get("router_jitter_noise"):
        raise ConversionError(f"{where}: field 'router_jitter_noise'={cfg['router_jitter_noise']} is not supported "
                              "(set it to 0)")
    return dict(num_experts=n_exp, moe_topk=topk, moe_ffn_hidden_size=ffn,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), moe_layers=layers,
                router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0))


def compare_archs(expected: Arch, got: Arch, *, expected_name: str, got_name: str) -> list[str]:
    """Field-by-field differences between two archs, each naming the HF config field.

    Returns e.g. ["num_key_value_heads: checkpoint has 2, model has 1"]; empty when equal.
    """
    diffs = []
    for attr, field in FIELD_OF.items():
        a, b = getattr(expected, attr), getattr(got, attr)
        if a != b:
            diffs.append(f"{field} ({attr}): {expected_name} has {a!r}, {got_name} has {b!r}")
    if expected.model_type != got.model_type:
        diffs.append(f"model_type: {expected_name} has {expected.model_type!r}, {got_name} has {got.model_type!r}")
    return diffs


def padded_vocab(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocab rows in megatron: the smallest size >= vocab_size divisible by `multiple * tp`.

    The one definition: the actor (`actor.model.padded_vocab_size`), the conversion tools and the planner
    all use it (torch-free, so the planner stays light)."""
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step
