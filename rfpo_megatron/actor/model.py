"""Megatron-core GPTModel construction from a Hugging Face config (Qwen2/2.5, Llama-3, Qwen3 dense, Qwen3-MoE).

``transformer_config_from_hf`` maps the validated ``convert.arch.Arch`` of an HF config (the
single HF-config reader, shared with the conversion tools) to a ``TransformerConfig``;
``build_model`` builds this rank's pipeline stage(s) with the TransformerEngine
layer spec on GPU when TE imports, and the local (pure megatron-core) spec
otherwise. These names are relied on by ``rfpo_megatron.convert``: keep them stable.
"""

from __future__ import annotations

from typing import Any

import torch

from rfpo_megatron.actor.compat import enable_cpu_compat
from rfpo_megatron.config import ConfigError
from rfpo_megatron.convert.arch import (SUPPORTED_MODEL_TYPES, Arch, arch_from_hf_config, hf_config_dict,  # noqa: F401
                                        padded_vocab)


padded_vocab_size = padded_vocab  # megatron's vocab padding (defined once, in convert.arch)


# megatron-core hard-codes these llama3 rope-scaling constants; only `factor` is configurable
_MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def megatron_rope_scaling(arch: Arch) -> tuple[bool, float]:
    """(rope_scaling, rope_scaling_factor) for GPTModel from ``arch.rope_scaling``; ValueError if megatron cannot express it."""
    if arch.rope_type == "default":
        return False, 8.0
    if arch.rope_type != "llama3":
        raise ValueError(f"rope_scaling.rope_type={arch.rope_type!r} is not supported (only 'llama3' or none)")
    rs = dict(arch.rope_scaling)
    for k, v in _MEGATRON_LLAMA3.items():
        if k in rs and float(rs[k]) != float(v):
            raise ValueError(f"rope_scaling.{k}={rs[k]} unsupported (megatron-core fixes it at {v})")
    return True, float(rs.get("factor", 8.0))


def transformer_config_from_hf(
    hf_config: Any,
    *,
    tp: int,
    pp: int,
    params_dtype: torch.dtype = torch.float32,
    **overrides: Any,
):
    """TransformerConfig for an HF Qwen2/2.5, Llama-3 or Qwen3 dense config (a dict or a PretrainedConfig).

    The architecture comes from ``convert.arch.arch_from_hf_config`` (the one HF reader; its
    ConversionError, a ValueError, names the bad field): num_kv_heads -> num_query_groups (GQA),
    head_dim -> kv_channels, ffn_hidden_size -> SwiGLU (gated_linear_unit + silu), rms_norm_eps ->
    layernorm_epsilon (RMSNorm), qkv_bias -> add_qkv_bias, qk_norm -> qk_layernorm (Qwen3).
    Biases on o_proj / MLP (``mlp_bias``) are refused. ``overrides`` are passed to TransformerConfig
    last (e.g. ``attention_dropout``). On CPU, ``use_cpu_initialization`` is forced on.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch = arch_from_hf_config(hf_config)
    cfg = hf_config_dict(hf_config)  # fields Arch does not carry (dropout, init std)
    layers, heads, kv_heads = arch.num_layers, arch.num_heads, arch.num_kv_heads
    if layers % pp != 0:
        raise ConfigError(f"num_hidden_layers={layers} is not divisible by actor.pipeline_model_parallel_size={pp}; "
                          f"choose a pipeline size that divides it")
    if heads % tp != 0:
        raise ConfigError(f"num_attention_heads={heads} is not divisible by actor.tensor_model_parallel_size={tp}")
    if kv_heads % tp != 0 and tp % kv_heads != 0:
        raise ConfigError(f"num_key_value_heads={kv_heads} must divide or be a multiple of "
                          f"actor.tensor_model_parallel_size={tp}")
    if arch.mlp_bias:
        raise ConfigError(f"model_type={arch.model_type!r} with mlp_bias=True is not supported")
    on_gpu = torch.cuda.is_available()
    fused = gpu_fusions() if on_gpu else {"rope": False, "wgrad": False}
    kw: dict[str, Any] = dict(
        num_layers=layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=arch.head_dim,
        layernorm_epsilon=arch.rms_norm_eps,
        normalization="RMSNorm",
        qk_layernorm=arch.qk_norm,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0,
        attention_dropout=float(cfg.get("attention_dropout", 0.0) or 0.0),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,  # only the local attention uses it (megatron's CUDA softmax kernels)
        persist_layer_norm=False,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=fused["rope"],  # TE's fused RoPE (also its THD form: no host sync per layer)
        gradient_accumulation_fusion=fused["wgrad"],  # fp32 main_grad accumulated inside the wgrad GEMM
        deallocate_pipeline_outputs=True,  # a stage frees the activation it sent once the next stage has it
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # megatron requires it with variable_seq_lengths
    )
    if arch.is_moe:
        kw.update(moe_config_fields(arch))
    kw.update(overrides)
    if arch.is_moe and kw.get("moe_token_dispatcher_type") == "allgather":
        if pp > 1:
            raise ConfigError("actor.moe_token_dispatcher_type='allgather' needs actor.pipeline_model_parallel_size=1 "
                              "(megatron's allgather dispatcher cannot take the variable sequence lengths the "
                              "pipeline sends); use 'alltoall'")
        kw["variable_seq_lengths"] = False  # no pipeline: nothing sends shapes
    return TransformerConfig(**kw)


def moe_config_fields(arch: Arch) -> dict[str, Any]:
    """TransformerConfig fields of a Qwen3-MoE architecture (router, experts, which layers are MoE).

    Qwen3-MoE routes by softmax over all experts then top-k; ``norm_topk_prob`` renormalises the k
    probabilities, which is megatron's softmax over the top-k logits (``moe_router_pre_softmax=False``);
    without it the top-k of the full softmax are used as is (``moe_router_pre_softmax=True``). The router runs
    in fp32 (``moe_router_dtype``). Experts use megatron's SequentialMLP (``moe_grouped_gemm`` off: megatron's
    grouped GEMMs need the grouped_gemm package or TransformerEngine, see docs/conversion.md). The
    load-balancing coefficients are set by the actor (``actor.moe_aux_loss_coef`` / ``moe_z_loss_coef``).
    """
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_grouped_gemm=False,
        moe_layer_freq=[1 if arch.is_moe_layer(i) else 0 for i in range(arch.num_layers)],
    )


def gpu_fusions() -> dict[str, bool]:
    """Which of megatron's GPU fusions this install provides: TE's fused RoPE; the fused wgrad accumulation,
    which every linear needs (the TE ones natively, megatron's own ColumnParallelLinear head through the
    ``fused_weight_gradient_mlp_cuda`` extension)."""
    try:
        import transformer_engine  # noqa: F401

        have_te = True
    except Exception:
        have_te = False
    from megatron.core.tensor_parallel import layers

    return {"rope": have_te, "wgrad": have_te and bool(getattr(layers, "_grad_accum_fusion_available", False))}


def uses_te_spec(spec: str) -> bool:
    """True when ``spec`` resolves to the TransformerEngine layer spec (TE importable and a CUDA GPU)."""
    if spec == "local":
        return False
    if spec not in ("auto", "te"):
        raise ValueError(f"actor.spec={spec!r} must be 'auto', 'te' or 'local'")
    try:
        import transformer_engine  # noqa: F401

        have_te = True
    except Exception:
        have_te = False
    if spec == "te":
        if not (have_te and torch.cuda.is_available()):
            raise ValueError("actor.spec='te' needs transformer_engine and a CUDA GPU; use spec='local'")
        return True
    return have_te and torch.cuda.is_available()


class LocalNorm:
    """Sequence-parallel-capable twin of megatron's ``WrappedTorchNorm`` (which asserts ``sequence_parallel`` off).

    Builds ``torch.nn.RMSNorm`` / ``LayerNorm`` over the hidden size in ``params_dtype`` and marks its
    parameters ``sequence_parallel`` so ``finalize_model_grads`` sums their gradients
    over the TP group (each TP rank normalises its own sequence shard under SP).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_: Any):
        dtype = config.params_dtype  # as TE's norms (WrappedTorchNorm left them fp32 in a bf16 model)
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: the local spec has RMSNorm and LayerNorm")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def _swap_norms(spec: Any) -> Any:
    """Replace megatron's WrappedTorchNorm by LocalNorm everywhere in a ModuleSpec tree (in place)."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if isinstance(spec, ModuleSpec):
        if spec.module is WrappedTorchNorm:
            spec.module = LocalNorm
        _swap_norms(spec.submodules)
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for f in dataclasses.fields(spec):
            v = getattr(spec, f.name)
            if v is WrappedTorchNorm:
                setattr(spec, f.name, LocalNorm)
            else:
                _swap_norms(v)
    return spec


def resolve_layout(packing: str, spec: str = "auto") -> str:
    """The micro-batch layout for ``actor.packing``: "thd" (packed) or "pad".

    auto: "thd" with the TransformerEngine spec, "pad" with the local spec (faster on CPU, see docs/actor.md).
    thd: packed sequences with either spec (the local spec gets the varlen core attention). pad: padded batches
    (megatron's local DotProductAttention; with TE the causal mask alone keeps real tokens off the padding).
    """
    if packing == "auto":
        return "thd" if uses_te_spec(spec) else "pad"
    if packing not in ("thd", "pad"):
        raise ValueError(f"actor.packing={packing!r} must be 'auto', 'thd' or 'pad'")
    return packing


def layer_spec(config, spec: str = "auto", layout: str = "pad", moe: bool = False):
    """ModuleSpec for one transformer layer: TE on GPU when importable, else local.

    With the local spec and ``layout="thd"`` (packed sequences) the core attention is
    ``varlen_attention.VarlenDotProductAttention`` (megatron's DotProductAttention plus cu_seqlens).
    ``moe``: the layer's MLP is megatron's MoE layer (router + SequentialMLP experts, ``config.num_moe_experts``).
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    experts = config.num_moe_experts if moe else None
    if uses_te_spec(spec):
        return specs.get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=False,
                                                                qk_layernorm=config.qk_layernorm)
    out = _swap_norms(specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False,
                                                     qk_layernorm=config.qk_layernorm,
                                                     normalization=config.normalization))
    if layout == "thd":
        from rfpo_megatron.actor.varlen_attention import VarlenDotProductAttention

        out.submodules.self_attention.submodules.core_attention = VarlenDotProductAttention
    elif layout != "pad":
        raise ValueError(f"layout={layout!r} must be 'pad' or 'thd'")
    return out


def block_spec(config, spec: str = "auto", layout: str = "pad", vp_stage: Any = None):
    """TransformerBlockSubmodules of this rank's (virtual) stage: its layers' spec and the final norm."""
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.transformer_block import (LayerNormImpl, TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pp_rank = mpu.get_pipeline_model_parallel_rank()
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    freq = config.moe_layer_freq if config.num_moe_experts else None
    if isinstance(freq, int):  # megatron's "every freq-th layer" form
        freq = [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    if freq is None:
        layers = [layer_spec(config, spec, layout)] * n
    else:  # per-layer: MoE where moe_layer_freq (one 0/1 entry per global layer) says so
        first = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        kinds = {k: layer_spec(config, spec, layout, moe=bool(k)) for k in set(freq)}
        layers = [kinds[freq[first + j]] for j in range(n)]
    final_norm = LayerNormImpl if uses_te_spec(spec) else LocalNorm
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm)


def build_model(
    hf_config: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    spec: str = "auto",
    layout: str = "pad",
    **overrides: Any,
) -> list:
    """This rank's model chunks: one GPTModel per virtual pipeline stage (one without virtual PP).

    Requires ``init_parallel``; the number of chunks is its ``vpp`` (megatron's virtual pipeline
    world size, None = 1). Chunk i is built with ``vp_stage=i``: it holds the global layers
    ``i * L / vpp + pp_rank * L / (pp * vpp)`` onward (megatron's ``get_transformer_layer_offset``;
    the layers' ``layer_number`` is global, which the weight converters rely on), the embedding
    only on chunk 0 of the first stage and the head on the last chunk of the last stage. Vocab is
    padded with ``padded_vocab_size``; the padded logit columns are masked by the log-prob pass.
    Tied embeddings follow ``tie_word_embeddings``. ``layout`` is the packing the model will be fed ("pad" or
    "thd", see ``resolve_layout``). Returns the chunks on the current device.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel

    if not torch.cuda.is_available():
        enable_cpu_compat()
    tp = mpu.get_tensor_model_parallel_world_size()
    pp = mpu.get_pipeline_model_parallel_world_size()
    vpp = mpu.get_virtual_pipeline_model_parallel_world_size()
    arch = arch_from_hf_config(hf_config)
    if arch.is_moe:
        ep = mpu.get_expert_model_parallel_world_size()
        if arch.num_experts % ep:
            raise ConfigError(f"num_experts={arch.num_experts} is not divisible by actor.expert_model_parallel_size={ep}")
        overrides.setdefault("expert_model_parallel_size", ep)
        overrides.setdefault("expert_tensor_parallel_size", mpu.get_expert_tensor_parallel_world_size())
    if vpp is not None:
        if arch.num_layers % (pp * vpp) != 0:
            raise ConfigError(
                f"num_hidden_layers={arch.num_layers} is not divisible by actor.pipeline_model_parallel_size={pp} x "
                f"actor.virtual_pipeline_model_parallel_size={vpp}; choose sizes whose product divides it"
            )
        overrides.setdefault("virtual_pipeline_model_parallel_size", vpp)
    config = transformer_config_from_hf(hf_config, tp=tp, pp=pp, params_dtype=params_dtype, **overrides)
    use_rs, rs_factor = megatron_rope_scaling(arch)
    theta = arch.rope_theta
    chunks = []
    for i in range(vpp or 1):
        vp_stage = i if vpp is not None else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, spec, layout, vp_stage),
            vocab_size=padded_vocab_size(arch.vocab_size, tp),
            max_sequence_length=int(hf_config_dict(hf_config).get("max_position_embeddings", 4096)),
            pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(theta) if theta.is_integer() else theta,
            rope_scaling=use_rs,
            rope_scaling_factor=rs_factor,
            vp_stage=vp_stage,
        )
        model.vocab_size_unpadded = arch.vocab_size  # type: ignore[attr-defined]
        if model.post_process:
            from rfpo_megatron.actor.output_rows import enable_response_rows

            enable_response_rows(model)  # logits for the response rows only (forward.run_schedule sets them)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        for p in model.parameters():
            # megatron's optimizer/grad-clip helpers expect this attribute on every param
            if not hasattr(p, "tensor_model_parallel"):
                from megatron.core.tensor_parallel import set_defaults_if_not_set_tensor_model_parallel_attributes

                set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        chunks.append(model)
    return chunks
