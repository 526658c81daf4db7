"""Per-GPU memory planner for the Megatron actor + colocated SGLang rollout, and a layout recommender.

Everything is in bytes per GPU (printed in GiB). Two phases are checked:

* **train**: bf16 weights + grad buffer + Adam state (fp32 main params, exp_avg, exp_avg_sq; sharded over
  DP with the distributed optimizer, or on the host with ``optimizer_cpu_offload``) + activations of the
  micro-batches in flight + the logits of one micro-batch + a fixed overhead (CUDA context, NCCL, allocator).
* **rollout** (colocated only): the actor state that stays resident (``actor_in_rollout``) + SGLang's static
  pool ``mem_fraction_static * capacity`` (weights / sglang_tp + KV cache) + overhead.

A layout fits when both phases are <= ``usable_frac`` (default 0.95: allocator fragmentation margin) of the
GPU's capacity. Parameter, gradient and optimizer numbers replay megatron-core's own rules (vocab padding
to 128*tp, the DDP buffer's 64-element param alignment and lcm(dp, 128) bucket padding, the distributed
optimizer's per-DP-rank bucket shards) and are exact; activations follow Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models") adapted to GQA + SwiGLU + flash attention,
see ``activation_bytes_per_token`` and docs/scaling.md.

Mixture-of-experts models (Qwen3-MoE): expert weights, grads and Adam state live in megatron's separate
expert-parallel DDP buffer — ``num_experts / ep`` local experts of ``3 h F_moe / etp`` each, the distributed
optimizer sharding them over the expert data-parallel size ``edp = tp cp dp / (etp ep)`` — while the dense part
(attention, norms, routers, embedding, head) is sharded over TP x PP and DP as before; MoE layers store the
router logits, the permuted expert inputs/outputs and permutation maps, and the alltoall dispatcher's send/receive
buffers are a per-layer transient (``moe_activation_bytes_per_token``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from rfpo_megatron.convert.arch import (
    SUPPORTED_MODEL_TYPES,
    Arch,
    ConversionError,
    arch_from_hf_config,
    hf_config_dict,
)

GiB = 1024**3
# usable bytes reported by nvidia-smi: H100 SXM 80 GB = 81559 MiB, H200 141 GB = 143771 MiB
GPU_CAPACITY = {"h100": 81559 * 2**20, "h200": 143771 * 2**20}
RECOMPUTE_MODES = ("none", "selective", "full")
ACTOR_IN_ROLLOUT = ("resident", "weights", "offloaded")

# Built-in HF config.json shapes so nothing needs a model hub.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen2.5-32b": dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                        tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen2.5-72b": dict(model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen3-32b": dict(model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=25600,
                      num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                      tie_word_embeddings=False, max_position_embeddings=40960),
    # Qwen/Qwen3-30B-A3B config.json: 48 MoE layers (decoder_sparse_step 1, no mlp_only_layers), 128 experts, top-8
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
                          max_position_embeddings=40960, router_aux_loss_coef=0.001),
}


# appended to convert.arch's "unsupported HF model_type" error (which lists the supported families)
_FAMILY_HINT = (" -- the planner plans what the actor builds; for another dense SwiGLU/RMSNorm decoder, set model_type"
                " in a copy of its config.json to the closest family (llama: no biases, qwen2: q/k/v bias, qwen3:"
                " q/k norm) for an estimate")


class PlanError(ValueError):
    """A user-facing planner error (one line naming the field and the fix)."""


@dataclass(frozen=True)
class ModelShape:
    """The shape facts of a dense decoder (Qwen2/2.5, Qwen3, Llama) that memory depends on."""

    name: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    # mixture of experts (0 experts = dense): experts per MoE layer, top-k, expert FFN size, the MoE layers' indices
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_layers: tuple[int, ...] = ()

    def is_moe_layer(self, i: int) -> bool:
        """Whether global layer i has a routed-expert MLP."""
        return self.num_experts > 0 and i in self.moe_layers


def shape_from_arch(arch: Arch, name: str) -> ModelShape:
    """The planner's ModelShape of a validated `convert.arch.Arch` (the actor's own reading of the HF config).

    Raises PlanError when the actor cannot build the architecture (biases on o_proj / the MLP).
    """
    if arch.mlp_bias or arch.o_bias:
        raise PlanError(f"{name}: field 'mlp_bias'/'attention_bias'=True (biases on o_proj and the MLP) is not "
                        "supported by the actor (megatron add_bias_linear=False); for an estimate set both to false in a copy "
                        "of config.json (the biases are a negligible share of memory)")
    return ModelShape(
        name=name,
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        tie_embeddings=arch.tie_embeddings,
        qkv_bias=arch.qkv_bias,
        qk_norm=arch.qk_norm,
        num_experts=arch.num_experts,  # MoE (Qwen3-MoE): as the actor reads them (convert.arch, validated there)
        moe_topk=arch.moe_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_layers=tuple(arch.moe_layers),
    )


def shape_from_hf(cfg: Any, name: Optional[str] = None) -> ModelShape:
    """ModelShape from an HF config (dict or `transformers.PretrainedConfig`), a config.json path, a model
    directory or a preset name.

    The config is read by `rfpo_megatron.convert.arch.arch_from_hf_config`, the same reader the actor and
    the conversion tools use, so the planner accepts exactly the families the actor builds (SUPPORTED_MODEL_TYPES:
    dense Qwen2/2.5, Llama-3, Qwen3, and Qwen3-MoE) and decides qkv_bias / qk_norm / head_dim / kv heads and the MoE
    fields (experts, top-k, expert width, which layers are MoE) the same way.
    Errors are one-line PlanErrors naming the field.
    """
    if isinstance(cfg, (str, os.PathLike)):
        key = str(cfg).lower()
        if key in PRESETS:
            return shape_from_hf(PRESETS[key], name=key)
        path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else str(cfg)
        if not os.path.isfile(path):
            raise PlanError(f"--model {cfg!s}: not a preset ({', '.join(PRESETS)}) nor an HF config.json/dir")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise PlanError(f"--model {cfg!s}: cannot read {path} as JSON ({e})") from None
        return shape_from_hf(data, name=name or str(cfg))
    d: dict[str, Any] = {}
    try:
        d = hf_config_dict(cfg)
        arch = arch_from_hf_config(d, where=name or "HF config")
    except ConversionError as e:
        hint = _FAMILY_HINT if d and d.get("model_type") not in SUPPORTED_MODEL_TYPES else ""
        raise PlanError(f"{e}{hint}") from None
    return shape_from_arch(arch, name or str(d.get("_name_or_path") or arch.model_type))


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    """Megatron's vocab padding as the actor does it (`convert.arch.padded_vocab`, the one definition)."""
    from rfpo_megatron.convert.arch import padded_vocab as _padded

    return _padded(vocab, tp, multiple=multiple)


def total_params(m: ModelShape, vocab_multiple: int = 128) -> int:
    """Unsharded parameter count (tp=1 padding), i.e. what SGLang holds across its TP group (experts included)."""
    return (sum(n for _, n, _ in stage_params(m, tp=1, pp=1, stage=0, vocab_multiple=vocab_multiple))
            + sum(n for _, n, _ in stage_expert_params(m, pp=1, stage=0)))


def stage_params(m: ModelShape, tp: int, pp: int, stage: int, vocab_multiple: int = 128) -> list[tuple[str, int, bool]]:
    """This (tp rank, pp stage)'s parameters in GPTModel.named_parameters() order (local spec).

    Returns [(name, numel_on_this_rank, shared_embedding)]. Column/row-parallel weights and the
    vocab-parallel embedding/output are divided by tp (linear_qkv's fused rows too, also when tp > num_kv_heads);
    norms (and row-parallel biases) are replicated.
    Layers are split evenly over pp; the first stage holds the embedding, the last the final norm and the
    output layer (with tied embeddings and pp > 1 the last stage holds a copy of the embedding).
    """
    if m.num_layers % pp:
        raise PlanError(f"pp={pp} must divide num_layers={m.num_layers}")
    if m.num_heads % tp or (m.num_kv_heads % tp and tp % m.num_kv_heads):
        raise PlanError(f"tp={tp} must divide num_attention_heads={m.num_heads} (and fit {m.num_kv_heads} kv heads)")
    h, d = m.hidden_size, m.head_dim
    q_local = m.num_heads // tp
    # linear_qkv is one ColumnParallelLinear of (nq + 2 nkv) * d rows split evenly over tp, also when
    # tp > num_kv_heads (megatron-core then all-gathers and slices; the weights are not replicated)
    qkv_rows = (m.num_heads + 2 * m.num_kv_heads) * d
    if qkv_rows % tp:
        raise PlanError(f"tp={tp} must divide the fused qkv rows (num_attention_heads + 2*num_key_value_heads)"
                        f" * head_dim = {qkv_rows}")
    v = padded_vocab(m.vocab_size, tp, vocab_multiple) // tp
    first, last = stage == 0, stage == pp - 1
    out: list[tuple[str, int, bool]] = []
    if first:
        out.append(("embedding.word_embeddings.weight", v * h, m.tie_embeddings and pp > 1))
    per = m.num_layers // pp
    qkv_out = qkv_rows // tp
    for i in range(per):
        p = f"decoder.layers.{i}."
        moe = m.is_moe_layer(stage * per + i)
        out.append((p + "input_layernorm.weight", h, False))
        out.append((p + "self_attention.linear_proj.weight", h * q_local * d, False))
        out.append((p + "self_attention.linear_qkv.weight", qkv_out * h, False))
        if m.qkv_bias:
            out.append((p + "self_attention.linear_qkv.bias", qkv_out, False))
        if m.qk_norm:
            out.append((p + "self_attention.q_layernorm.weight", d, False))
            out.append((p + "self_attention.k_layernorm.weight", d, False))
        out.append((p + "pre_mlp_layernorm.weight", h, False))
        if moe:  # the router is replicated over TP and EP; the experts are in stage_expert_params
            out.append((p + "mlp.router.weight", m.num_experts * h, False))
            continue
        out.append((p + "mlp.linear_fc1.weight", 2 * (m.ffn_hidden_size // tp) * h, False))
        out.append((p + "mlp.linear_fc2.weight", h * (m.ffn_hidden_size // tp), False))
    if last:
        out.append(("decoder.final_layernorm.weight", h, False))
        if not m.tie_embeddings:
            out.append(("output_layer.weight", v * h, False))
        elif pp > 1:
            out.append(("output_layer.weight", v * h, True))
    return out


def stage_expert_params(m: ModelShape, pp: int, stage: int, ep: int = 1, etp: int = 1) -> list[tuple[str, int, bool]]:
    """This (ep rank, etp rank, pp stage)'s routed-expert weights (megatron SequentialMLP names), the params of
    megatron's expert-parallel DDP buffer: per MoE layer ``num_experts / ep`` local experts, each
    linear_fc1 [2 F_moe / etp, h] (gate and up) and linear_fc2 [h, F_moe / etp]."""
    if not m.num_experts:
        return []
    if m.num_experts % ep:
        raise PlanError(f"actor.expert_model_parallel_size={ep} must divide num_experts={m.num_experts}")
    if m.moe_ffn_hidden_size % etp:
        raise PlanError(f"actor.expert_tensor_parallel_size={etp} must divide moe_intermediate_size={m.moe_ffn_hidden_size}")
    per = m.num_layers // pp
    h, f = m.hidden_size, m.moe_ffn_hidden_size // etp
    out = []
    for i in range(per):
        if not m.is_moe_layer(stage * per + i):
            continue
        for j in range(m.num_experts // ep):
            p = f"decoder.layers.{i}.mlp.experts.local_experts.{j}."
            out.append((p + "linear_fc1.weight", 2 * f * h, False))
            out.append((p + "linear_fc2.weight", h * f, False))
    return out


@dataclass
class BufferLayout:
    """Megatron DDP param/grad buffer of one rank: padded size and the optimizer's owned elements."""

    numel: int  # buffer elements incl. padding (= grad buffer; = bf16 param buffer with the dist. optimizer)
    numel_params: int  # real parameter elements (no padding)
    optimizer_numel: list[int]  # per DP rank: real (non-padding) elements whose Adam state that rank owns


def buffer_layout(numels: list[int], shared: list[bool], dp: int, distributed_optimizer: bool,
                  bucket_size: Optional[int] = None) -> BufferLayout:
    """Replay megatron-core's _ParamAndGradBuffer layout (params in reverse order, 64-element param
    alignment and lcm(dp, 128) bucket-end padding with the distributed optimizer, shared embeddings in
    their own bucket) and DistributedOptimizer's shard ranges (rank r owns [r, r+1) * size/dp of each bucket).
    ``bucket_size`` is megatron's (None unless overlap_grad_reduce)."""
    def pad(x: int, div: int) -> int:
        return -(-x // div) * div

    div = math.lcm(dp, 128)
    ranges: list[tuple[int, int]] = []
    buckets: list[tuple[int, int]] = []
    start = bstart = 0
    nparams_in_bucket = 0
    end = 0
    for n, sh in zip(numels[::-1], shared[::-1]):
        if distributed_optimizer:
            start = pad(start, 64)
        needs_own = sh and distributed_optimizer
        if needs_own and nparams_in_bucket:
            bend = pad(start, div) if distributed_optimizer else start
            buckets.append((bstart, bend)); bstart = start = bend; nparams_in_bucket = 0
        end = start + n
        ranges.append((start, end)); nparams_in_bucket += 1
        if (bucket_size is not None and end - bstart >= bucket_size) or needs_own:
            bend = pad(end, div) if distributed_optimizer else end
            buckets.append((bstart, bend)); bstart = start = bend; nparams_in_bucket = 0
        else:
            start = end
    if nparams_in_bucket:
        bend = pad(end, div) if distributed_optimizer else end
        buckets.append((bstart, bend))
    total = buckets[-1][1] if buckets else 0
    owned = [0] * dp
    if distributed_optimizer:
        for b0, b1 in buckets:
            shard = (b1 - b0) // dp
            for r in range(dp):
                s0, s1 = b0 + r * shard, b0 + (r + 1) * shard
                owned[r] += sum(max(0, min(e, s1) - max(s, s0)) for s, e in ranges)
    else:
        owned = [sum(numels)] * dp
    return BufferLayout(numel=total, numel_params=sum(numels), optimizer_numel=owned)


@dataclass
class Layout:
    """Parallel layout. tp/pp/cp/dp are the actor's; sglang_tp and mem_fraction_static the rollout's."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    sequence_parallel: bool = True  # megatron SP (only meaningful with tp > 1)
    sglang_tp: int = 1
    mem_fraction_static: float = 0.7
    colocate: bool = True
    ep: int = 1  # expert parallel (actor.expert_model_parallel_size)
    etp: Optional[int] = None  # expert tensor parallel; None = tp (megatron's default)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def edp(self) -> int:
        """Expert data-parallel size: megatron's expert grid is etp x ep x edp over the tp x cp x dp ranks of a stage."""
        n, d = self.tp * self.cp * self.dp, self.expert_tp * self.ep
        if n % d:
            raise PlanError(f"expert_tensor_parallel_size x expert_model_parallel_size = {self.expert_tp} x {self.ep} "
                            f"must divide tp x cp x dp = {n}")
        return n // d


@dataclass
class TrainSettings:
    """Batch/sequence and optimizer settings that change memory."""

    tokens_per_microbatch: int = 8192  # packed tokens of one micro-batch before CP split (max_tokens_per_gpu*cp)
    seq_len: int = 8192  # longest sequence (prompt + response); unfused attention scores and KV sizing use it
    num_microbatches: Optional[int] = None  # per step per DP rank; None = pp (the 1F1B steady state)
    recompute: str = "none"
    recompute_method: str = "uniform"  # full recompute: uniform (chunks of recompute_num_layers) | block
    recompute_num_layers: int = 1  # uniform: layers per checkpointed chunk; block: recomputed layers per stage
    response_tokens_per_microbatch: Optional[int] = None  # rows that get logits (None: every token)
    use_distributed_optimizer: bool = True
    optimizer_cpu_offload: bool = False
    grad_fp32: bool = True  # grad buffer dtype (megatron grad_reduce_in_fp32 / accumulate-allreduce-grads-in-fp32)
    param_dtype: str = "bf16"  # bf16 (GPU) | fp32 (the CPU/tiny path: Adam keeps no separate main copy)
    norms_fp32: bool = False  # norm weights in fp32 (own DDP buffer); the actor's LocalNorm uses params_dtype
    fused_logits: bool = True
    flash_attention: bool = True
    overlap_grad_reduce: bool = False
    grad_reduce_bucket_size: Optional[int] = None  # megatron's DDP bucket_size (None: max(40M, 1M*dp))
    deallocate_pipeline_outputs: bool = True  # the actor's setting: a stage frees the outputs it sent
    actor_in_rollout: str = "resident"  # resident | weights (grads+optimizer freed/offloaded) | offloaded
    overhead_gib: float = 4.0  # CUDA context + NCCL buffers + allocator slack, per phase
    kv_min_seqs: int = 16  # a SGLang engine must hold at least this many full-length sequences
    moe_aux_loss: bool = True  # MoE load-balancing loss on (its fp32 router scores are kept for backward)


def activation_bytes_per_token(m: ModelShape, tp: int, sp: bool, seq_len: int, recompute: str,
                               flash: bool = True, moe: bool = False, etp: int = 1,
                               aux_loss: bool = True) -> tuple[float, float]:
    """(stored bytes per token per layer, transient working set per token) for one transformer layer.

    Per token in bf16 (Korthikanti et al. 2022 Sec. 4, with dropout 0, GQA, SwiGLU, RMSNorm):
      norm inputs + linear inputs: input_norm in, qkv in, pre_mlp_norm in, fc1 in   = 4 * 2h   (/tp with SP)
      q, k, v (attention core inputs)                                                = 2 (nq + 2 nkv) d / tp
      attention output (core out = linear_proj in)                                   = 2 nq d / tp
      flash-attention softmax stats (fp32 logsumexp)                                 = 4 nq / tp
      [unfused attention instead: softmax probabilities                               = 2 nq s / tp]
      fc1 output (gate, up) + SwiGLU output (fc2 in)                                  = (2*2f + 2f) / tp
    selective recompute drops the attention-core internals (stats / probabilities); full recompute keeps only
    the layer input 2h (/tp with SP) and re-runs one layer at a time (the 'none' amount, transient).
    ``moe``: a routed-expert layer, whose MLP term is ``moe_mlp_bytes_per_token`` instead of 6f/tp.
    """
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    nq, nkv = m.num_heads, max(m.num_kv_heads, 1)
    spdiv = tp if (sp and tp > 1) else 1
    core_internal = (4 * nq if flash else 2 * nq * seq_len) / tp
    mlp = moe_mlp_bytes_per_token(m, tp, sp, etp, aux_loss) if moe else 6 * f / tp
    none = 8 * h / spdiv + (2 * (nq + 2 * nkv) * d + 2 * nq * d) / tp + mlp + core_internal
    if recompute == "none":
        return none, 0.0
    if recompute == "selective":
        return none - core_internal, 0.0
    if recompute == "full":
        return 2 * h / spdiv, none
    raise PlanError(f"actor.recompute={recompute!r} must be one of {RECOMPUTE_MODES}")


def moe_mlp_bytes_per_token(m: ModelShape, tp: int, sp: bool, etp: int = 1, aux_loss: bool = True) -> float:
    """Stored bytes per token (of the micro-batch) on one rank of a routed-expert MLP (bf16, router fp32).

    The router sees this rank's tokens (1/tp of them with SP, which megatron requires for MoE with TP > 1);
    each token goes to k experts, and expert TP all-gathers the routed tokens over etp, so a rank handles
    ``slots = k etp / tp`` routed copies per token on average (balanced routing):
      router logits (fp32) 4E, routing map (bool) E, with the aux loss its fp32 scores 4E        (/tp with SP)
      per routed copy: expert input (fc1 in) 2h, expert output kept for the probability weighting 2h,
      permutation index (int64) 8                                                              x slots
      fc1 output (gate, up) 2*2 F/etp + SwiGLU output 2 F/etp                                   x slots
    """
    h, e, f = m.hidden_size, m.num_experts, m.moe_ffn_hidden_size
    spdiv = tp if (sp and tp > 1) else 1
    router = (4 * e + e + (4 * e if aux_loss else 0)) / spdiv
    slots = m.moe_topk * etp / spdiv
    return router + slots * (4 * h + 8 + 6 * f / etp)


def moe_dispatcher_bytes_per_token(m: ModelShape, tp: int, sp: bool, etp: int = 1) -> float:
    """Transient bytes per token of megatron's alltoall token dispatcher for one MoE layer (bf16): the permuted
    tokens it sends and the ones it receives, [tokens k / tp, h] each, plus the expert-TP all-gather output."""
    spdiv = tp if (sp and tp > 1) else 1
    sent = 2 * m.hidden_size * m.moe_topk / spdiv
    return 2 * sent + (sent * etp if etp > 1 else 0.0)


def stage_activation_bytes(m: ModelShape, layers: int, tp: int, sp: bool, s: "TrainSettings",
                           in_flight: int, tokens: float, stage: int = 0, etp: int = 1) -> float:
    """Activation bytes of one pipeline stage with ``layers`` layers and ``in_flight`` micro-batches stored.

    none / selective: every layer stores its amount (``activation_bytes_per_token``).
    full, uniform: the layers run in chunks of ``recompute_num_layers``; each chunk stores its input (2h, /tp
    with SP) and the backward re-runs one chunk (its 'none' amount, transient).
    full, block: the first ``recompute_num_layers`` layers of the stage are recomputed (input stored, one
    re-run transient), the others store the 'none' amount.
    """
    def per_layer(mode: str, moe: bool) -> tuple[float, float]:
        return activation_bytes_per_token(m, tp, sp, s.seq_len, mode, s.flash_attention, moe, etp, s.moe_aux_loss)

    kinds = [m.is_moe_layer(stage * layers + i) for i in range(layers)]
    store = [per_layer(s.recompute, k)[0] for k in kinds]
    if s.recompute != "full":
        return in_flight * sum(store) * tokens
    none = [per_layer("none", k)[0] for k in kinds]
    k = max(1, int(s.recompute_num_layers))
    if s.recompute_method == "block":
        rec = min(k, layers)
        return (in_flight * (sum(store[:rec]) + sum(none[rec:])) * tokens
                + (max(none[:rec]) * tokens if rec else 0))
    if s.recompute_method != "uniform":
        raise PlanError(f"actor.recompute_method={s.recompute_method!r} must be uniform or block")
    k = min(k, layers)
    chunks = [none[c:c + k] for c in range(0, layers, k)]
    return in_flight * len(chunks) * store[0] * tokens + max(sum(c) for c in chunks) * tokens


def pipeline_held_bytes(m: ModelShape, tp: int, sp: bool, stage: int, pp: int, s: "TrainSettings",
                        in_flight: int, tokens: float) -> float:
    """Bytes the 1F1B schedule holds outside the layers on one stage.

    * every stage but the last keeps the output tensor it sent to the next stage for each micro-batch in
      flight ([s(/tp with SP), b, h] in bf16) unless ``deallocate_pipeline_outputs``;
    * stage 0's embedding output: the vocab-parallel embedding produces the full [s, b, h] (before the
      sequence-parallel scatter), transient, one micro-batch.
    """
    spdiv = tp if (sp and tp > 1) else 1
    act_b = 2  # bf16 activations
    held = 0.0
    if stage < pp - 1 and not s.deallocate_pipeline_outputs:
        held += in_flight * act_b * m.hidden_size / spdiv * tokens
    if stage == 0:
        held += act_b * m.hidden_size * tokens
    return held


def logits_bytes_per_token(m: ModelShape, tp: int, fused: bool, vocab_multiple: int = 128) -> int:
    """Peak logits memory per logit row on the last stage, [N, V/tp] (N = response rows: the actor's output
    layer computes the rows that predict response tokens only, ``actor/output_rows.py``):
    naive: bf16 logits (2) + fp32 upcast (4) + fp32 softmax kept for backward (4) + fp32 grad (4) = 14 B/elem;
    fused (vocab-parallel Triton kernel, never upcast): bf16 logits (2) + bf16 grad (2) = 4 B/elem."""
    return padded_vocab(m.vocab_size, tp, vocab_multiple) // tp * (4 if fused else 14)


@dataclass
class MemoryPlan:
    """Per-GPU bytes of the worst pipeline stage in each phase, and the verdicts."""

    model: str
    layout: Layout
    settings: TrainSettings
    worst_stage: int
    params: int  # parameters on this rank (unpadded)
    weights: int
    grads: int
    optimizer_gpu: int
    optimizer_cpu: int  # host bytes per GPU (x gpus_per_node for a node's RAM)
    activations: int
    logits: int  # on this (worst) stage: only the last pipeline stage holds logits
    logits_naive: int  # the last stage's logits without / with the fused kernel (for comparison)
    logits_fused: int
    overhead: int
    train_peak: int
    sglang_weights: int
    kv_pool: int
    kv_tokens: int
    actor_resident: int
    rollout_peak: int
    fits: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # MoE (0 for dense): of weights / grads / optimizer_gpu the routed experts; the alltoall dispatcher's
    # send/receive buffers of one layer (in train_peak); of activations the router logits/scores kept
    expert_weights: int = 0
    expert_grads: int = 0
    expert_optimizer: int = 0
    dispatcher: int = 0
    router_logits: int = 0


def kv_bytes_per_token(m: ModelShape, sglang_tp: int) -> int:
    """KV cache bytes per token on one SGLang GPU (bf16 K and V, kv heads replicated when tp > nkv)."""
    return 2 * 2 * m.num_layers * max(m.num_kv_heads // sglang_tp, 1) * m.head_dim


@dataclass
class RankState:
    """Persistent training state of one rank (bytes), replaying megatron's buffers and optimizer shards."""

    params: int  # parameters on this rank (no padding)
    weights: int  # model params (the DDP param buffer incl. padding with the distributed optimizer)
    grads: int  # DDP grad buffer(s) incl. padding
    optimizer: int  # Adam state of the elements this DP rank owns (+ fp32 main copy for bf16 params)
    optimizer_fp32_grad: int  # fp32 grad copy an offloaded (host) optimizer keeps
    buffers: list[BufferLayout]
    main_params: int = 0  # of ``optimizer``: the fp32 main params (bf16 params only)
    moments: int = 0  # of ``optimizer``: Adam exp_avg + exp_avg_sq (fp32)
    on_host: bool = False  # optimizer_cpu_offload: main params, moments and an fp32 grad copy are host memory
    # of params / weights / grads / optimizer: the routed experts (megatron's expert-parallel buffer, sharded over edp)
    expert_params: int = 0
    expert_weights: int = 0
    expert_grads: int = 0
    expert_optimizer: int = 0


def rank_state_bytes(m: ModelShape, tp: int, pp: int, stage: int, dp: int, s: TrainSettings,
                     vocab_multiple: int = 128, dp_rank: Optional[int] = None, ep: int = 1,
                     etp: Optional[int] = None, cp: int = 1) -> RankState:
    """Weights/grads/Adam bytes on one (tp, pp=stage, dp) rank; dp_rank=None takes the largest DP shard.

    DDP groups params by dtype into one buffer each (bf16, and fp32 norms with ``norms_fp32``).
    bf16 params: weights 2 B, grads 4 B (grad_fp32) or 2 B, Adam 12 B/owned element (fp32 main + 2 moments).
    fp32 params: weights 4 B, grads 4 B, Adam 8 B/owned element (the fp32 param is its own main copy).
    MoE: with EP > 1 the routed experts (``stage_expert_params``) form megatron's expert-parallel buffer, laid out
    and sharded like the dense one but over the expert data-parallel size ``tp cp dp / (etp ep)`` (etp None = tp);
    dp_rank then indexes the expert DP ranks for that buffer (the largest shard when None). With EP = 1 megatron
    keeps them in the dense buffer (``allreduce`` stays True: tensor_parallel/layers.py), after each layer's router.
    """
    if s.param_dtype not in ("bf16", "fp32"):
        raise PlanError(f"param_dtype={s.param_dtype!r} must be 'bf16' or 'fp32'")
    ps = stage_params(m, tp, pp, stage, vocab_multiple)
    etp_ = tp if etp is None else etp
    experts = stage_expert_params(m, pp, stage, ep, etp_)
    n_expert = sum(n for _, n, _ in experts)
    if experts and ep == 1:  # megatron's order: each layer's experts right after its router, one buffer
        by_layer: dict[str, list] = {}
        for e in experts:
            by_layer.setdefault(e[0].split(".mlp.")[0], []).append(e)
        ps = [x for item in ps for x in ([item] + (by_layer.get(item[0].split(".mlp.")[0], [])
                                                    if item[0].endswith("mlp.router.weight") else []))]
        experts = []
    low = s.param_dtype == "bf16"
    groups: dict[bool, list[tuple[str, int, bool]]] = {}
    for name, n, sh in ps:
        is_fp32 = (not low) or (s.norms_fp32 and "layernorm" in name)
        groups.setdefault(is_fp32, []).append((name, n, sh))
    # megatron's DDP: bucket_size only with overlap_grad_reduce, and never on pipeline stages > 0
    bucket = (s.grad_reduce_bucket_size or max(40_000_000, 1_000_000 * dp)) if s.overlap_grad_reduce else None
    if stage > 0:
        bucket = None
    edp = Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, etp=etp_).edp if experts else dp
    weights = grads = opt = fp32g = params = main = mom = 0
    bufs = []
    todo = [(is_fp32, items, dp) for is_fp32, items in groups.items()]
    if experts:
        todo.append((not low, experts, edp))
    ex = [0, 0, 0, 0]  # expert params, weights, grads, optimizer
    for k, (is_fp32, items, group_dp) in enumerate(todo):
        buf = buffer_layout([n for _, n, _ in items], [sh for _, _, sh in items], group_dp,
                            s.use_distributed_optimizer, bucket)
        bufs.append(buf)
        r = None if dp_rank is None else min(dp_rank, group_dp - 1)
        owned = buf.optimizer_numel[r] if r is not None else max(buf.optimizer_numel)
        n_real = sum(n for _, n, _ in items)
        params += n_real
        pbytes = 4 if is_fp32 else 2
        weights += pbytes * (buf.numel if s.use_distributed_optimizer else n_real)
        grads += (4 if (is_fp32 or s.grad_fp32) else 2) * buf.numel
        opt += (8 if is_fp32 else 12) * owned
        main += 0 if is_fp32 else 4 * owned
        mom += 8 * owned
        fp32g += 4 * owned
        if experts and k == len(todo) - 1:
            ex = [n_real, (4 if is_fp32 else 2) * (buf.numel if s.use_distributed_optimizer else n_real),
                  (4 if (is_fp32 or s.grad_fp32) else 2) * buf.numel, (8 if is_fp32 else 12) * owned]
    if n_expert and not experts:  # EP = 1: the experts' share of the dense buffer (padding not attributed)
        pb = 2 if low else 4
        ex = [n_expert, pb * n_expert, (4 if (not low or s.grad_fp32) else 2) * n_expert,
              (12 if low else 8) * n_expert // (dp if s.use_distributed_optimizer else 1)]
    return RankState(params, weights, grads, opt, fp32g, bufs, main, mom, bool(s.optimizer_cpu_offload), *ex)


def plan_memory(m: ModelShape, lay: Layout, s: TrainSettings, gpu_capacity: Optional[dict[str, int]] = None,
                usable_frac: float = 0.95, vocab_multiple: int = 128) -> MemoryPlan:
    """Memory plan of ``m`` under layout ``lay`` and settings ``s`` (see the module docstring)."""
    caps = gpu_capacity or GPU_CAPACITY
    if s.recompute not in RECOMPUTE_MODES:
        raise PlanError(f"actor.recompute={s.recompute!r} must be one of {RECOMPUTE_MODES}")
    if s.actor_in_rollout not in ACTOR_IN_ROLLOUT:
        raise PlanError(f"actor_in_rollout={s.actor_in_rollout!r} must be one of {ACTOR_IN_ROLLOUT}")
    if not 0.0 < lay.mem_fraction_static < 1.0:
        raise PlanError(f"rollout.mem_fraction_static={lay.mem_fraction_static} must be in (0, 1)")
    if s.optimizer_cpu_offload and not (s.use_distributed_optimizer and s.param_dtype == "bf16"):
        raise PlanError("optimizer_cpu_offload needs the distributed optimizer and bf16 params (as the actor: "
                        "megatron's hybrid CPU-Adam with the precision-aware optimizer)")
    sp = lay.sequence_parallel and lay.tp > 1
    tokens = s.tokens_per_microbatch / lay.cp
    n_mb = s.num_microbatches or lay.pp
    activation_bytes_per_token(m, lay.tp, sp, s.seq_len, s.recompute, s.flash_attention)  # validates
    resp = s.response_tokens_per_microbatch
    rows = min(tokens, resp / lay.cp) if resp is not None else tokens
    best: Optional[MemoryPlan] = None
    max_resident = 0
    if m.num_experts:
        if lay.tp > 1 and not sp:
            raise PlanError(f"MoE with actor.tensor_model_parallel_size={lay.tp} needs actor.sequence_parallel=true "
                            "(megatron requires sequence parallelism for MoE with TP > 1)")
        _ = lay.edp  # validates the expert grid
    elif lay.ep != 1:
        raise PlanError(f"actor.expert_model_parallel_size={lay.ep} needs a mixture-of-experts model ({m.name} is dense)")
    etp = lay.expert_tp
    for stage in range(lay.pp):
        st = rank_state_bytes(m, lay.tp, lay.pp, stage, lay.dp, s, vocab_multiple, ep=lay.ep, etp=etp, cp=lay.cp)
        n_params, weights, grads, opt = st.params, st.weights, st.grads, st.optimizer
        opt_gpu, opt_cpu = (0, opt + st.optimizer_fp32_grad) if s.optimizer_cpu_offload else (opt, 0)
        in_flight = min(lay.pp - stage, n_mb)
        layers = m.num_layers // lay.pp
        n_moe = sum(m.is_moe_layer(stage * layers + i) for i in range(layers))
        act = int(stage_activation_bytes(m, layers, lay.tp, sp, s, in_flight, tokens, stage, etp)
                  + pipeline_held_bytes(m, lay.tp, sp, stage, lay.pp, s, in_flight, tokens))
        dispatcher = int(moe_dispatcher_bytes_per_token(m, lay.tp, sp, etp) * tokens) if n_moe else 0
        spdiv = lay.tp if sp else 1
        router = int(in_flight * n_moe * (9 if s.moe_aux_loss else 5) * m.num_experts / spdiv * tokens) \
            if s.recompute != "full" else 0
        last = stage == lay.pp - 1
        l_naive = int(rows * logits_bytes_per_token(m, lay.tp, False, vocab_multiple))
        l_fused = int(rows * logits_bytes_per_token(m, lay.tp, True, vocab_multiple))
        logits = (l_fused if s.fused_logits else l_naive) if last else 0
        overhead = int(s.overhead_gib * GiB)
        train_peak = weights + grads + opt_gpu + act + logits + overhead + dispatcher
        resident = {"resident": weights + grads + opt_gpu, "weights": weights, "offloaded": 0}[s.actor_in_rollout]
        p = MemoryPlan(m.name, lay, s, stage, n_params, weights, grads, opt_gpu, opt_cpu, act, logits, l_naive,
                       l_fused, overhead, train_peak, 0, 0, 0, resident, 0,
                       expert_weights=st.expert_weights, expert_grads=st.expert_grads,
                       expert_optimizer=0 if s.optimizer_cpu_offload else st.expert_optimizer,
                       dispatcher=dispatcher, router_logits=router)
        max_resident = max(max_resident, resident)
        if best is None or p.train_peak > best.train_peak:
            best = p
    assert best is not None
    best.actor_resident = max_resident  # the rollout phase is decided by the stage with most resident state
    # SGLang holds the unpadded HF weights, sharded over sglang_tp; its KV pool is the static pool minus them.
    sg_w = 2 * total_params(m, 1) // lay.sglang_tp
    kv_tok = kv_bytes_per_token(m, lay.sglang_tp)
    best.sglang_weights = sg_w
    best.fits = {}
    for gpu, cap in caps.items():
        pool = int(lay.mem_fraction_static * cap)
        kv_pool = pool - sg_w
        rollout_peak = (best.actor_resident + pool + best.overhead) if lay.colocate else (pool + best.overhead)
        ok_kv = kv_pool // kv_tok >= s.kv_min_seqs * s.seq_len
        best.fits[gpu] = best.train_peak <= usable_frac * cap and rollout_peak <= usable_frac * cap and ok_kv
        if gpu == "h100":
            best.kv_pool, best.kv_tokens, best.rollout_peak = kv_pool, max(kv_pool // kv_tok, 0), rollout_peak
    if best.kv_pool <= 0:
        best.notes.append("SGLang weights exceed mem_fraction_static: raise sglang_tp or the fraction")
    return best


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def recommend(m: ModelShape, n_gpus: int, s: TrainSettings, gpu: str = "h100", gpus_per_node: int = 8,
              mem_fraction_static: Optional[float] = None, sglang_tp: Optional[int] = None, colocate: bool = True,
              min_hidden_per_tp: int = 1024, top: int = 5) -> list[MemoryPlan]:
    """Feasible layouts for ``n_gpus``, best first. Search: tp | gpus_per_node, pp | num_layers, cp = 1,
    dp = n_gpus/(tp*pp), recompute none -> selective -> full (the first that fits), Adam on GPU, then offloaded;
    SGLang's mem_fraction_static is the given one, or (None) the largest of 0.85, 0.80, ..., 0.30 that fits.

    Ranking (documented in docs/scaling.md):
      1. Adam on the GPU before CPU offload (offload costs host<->device traffic every step);
      2. memory-bound regime (offload needed): largest TP inside a node, then smallest PP -- the least
         GPU-resident state per rank (slime's Qwen3-32B on 8 GPUs: TP=8 + offloaded Adam);
         otherwise: TP with hidden/tp >= min_hidden_per_tp (GEMM efficiency) preferred, then the smallest PP
         that fits both phases, then the lightest recompute, then the smallest TP (NeMo-RL's Qwen3-32B on
         32 GPUs: TP=4, PP=4).
    """
    plans: list[tuple[tuple, MemoryPlan]] = []
    for offload in (False, True):
        for tp in _divisors(gpus_per_node):
            if m.num_heads % tp or tp > n_gpus:
                continue
            for pp in _divisors(m.num_layers):
                if n_gpus % (tp * pp):
                    continue
                dp = n_gpus // (tp * pp)
                fracs = [mem_fraction_static] if mem_fraction_static else [x / 100 for x in range(85, 29, -5)]
                p = _first_fit(m, tp, pp, dp, fracs, sglang_tp, gpus_per_node, n_gpus, colocate, s, offload, gpu)
                if p is None:
                    continue
                rc = RECOMPUTE_MODES.index(p.settings.recompute)
                eff = 0 if m.hidden_size // tp >= min_hidden_per_tp or tp == 1 else 1
                key = (1, -tp, pp, rc) if offload else (0, eff, pp, rc, tp)
                plans.append((key, p))
        if plans:
            break
    plans.sort(key=lambda kp: kp[0])
    return [p for _, p in plans[:top]]


def _first_fit(m: ModelShape, tp: int, pp: int, dp: int, fracs: list[float], sglang_tp: Optional[int],
               gpus_per_node: int, n_gpus: int, colocate: bool, s: TrainSettings, offload: bool,
               gpu: str) -> Optional[MemoryPlan]:
    """The lightest recompute (then the largest SGLang fraction) that fits this layout, or None."""
    cap = GPU_CAPACITY[gpu]
    for rc in RECOMPUTE_MODES:
        st = dataclasses.replace(s, recompute=rc, optimizer_cpu_offload=offload)
        for frac in fracs:
            sg_tp = sglang_tp or min(gpus_per_node, n_gpus, max(tp, _min_sglang_tp(m, frac, cap)))
            lay = Layout(tp=tp, pp=pp, dp=dp, sglang_tp=sg_tp, mem_fraction_static=frac, colocate=colocate)
            try:
                p = plan_memory(m, lay, st)
            except PlanError:
                return None
            if p.fits[gpu]:
                return p
    return None


def _min_sglang_tp(m: ModelShape, frac: float, cap: int) -> int:
    """Smallest power-of-two SGLang TP whose weights take at most half the static pool."""
    tp = 1
    while 2 * total_params(m, 1) // tp > 0.5 * frac * cap and tp < 64:
        tp *= 2
    return tp


def _row(label: str, nbytes: float, extra: str = "") -> str:
    return f"  {label:<52}{nbytes / GiB:9.2f}{('   ' + extra) if extra else ''}"


def format_plan(p: MemoryPlan, usable_frac: float = 0.95) -> str:
    """Human-readable table of one plan (GiB per GPU)."""
    lay, s = p.layout, p.settings
    sp = "on" if lay.sequence_parallel and lay.tp > 1 else "off"
    mode = "colocated" if lay.colocate else "disaggregated"
    grad = "fp32" if (s.grad_fp32 or s.param_dtype == "fp32") else "bf16"
    moe = p.expert_weights > 0
    ep = f" EP={lay.ep} ETP={lay.expert_tp} EDP={lay.edp}" if moe else ""
    lines = [
        f"model {p.model}: actor TP={lay.tp} PP={lay.pp} CP={lay.cp} DP={lay.dp}{ep} (SP {sp}, {lay.gpus} GPUs) | "
        f"SGLang TP={lay.sglang_tp} mem_fraction_static={lay.mem_fraction_static:.2f} ({mode})",
        f"  tokens/micro-batch {s.tokens_per_microbatch}, seq {s.seq_len}, recompute {s.recompute}, "
        f"{'distributed' if s.use_distributed_optimizer else 'replicated'} Adam"
        f"{' CPU-offloaded' if s.optimizer_cpu_offload else ''}, grads {grad}, "
        f"logits {'fused' if s.fused_logits else 'naive'}, actor during rollout: {s.actor_in_rollout}",
        f"train phase, worst stage {p.worst_stage} ({p.params / 1e9:.3f} B params on the rank){'GiB/GPU':>20}",
        _row(f"weights ({s.param_dtype})", p.weights),
        *([_row(f"  of which routed experts (1/EP={lay.ep}, 1/ETP={lay.expert_tp})", p.expert_weights)] if moe else []),
        _row(f"grads ({grad} buffer)", p.grads),
        *([_row("  of which routed experts", p.expert_grads)] if moe else []),
        _row("optimizer (fp32 main + Adam m, v)", p.optimizer_gpu,
             f"host: {p.optimizer_cpu / GiB:.1f} GiB/GPU" if p.optimizer_cpu else ""),
        *([_row(f"  of which routed experts (sharded over EDP={lay.edp})", p.expert_optimizer)] if moe else []),
        _row(f"activations ({s.recompute} recompute, {min(lay.pp - p.worst_stage, s.num_microbatches or lay.pp)} mb"
             " in flight)", p.activations, "incl. held stage outputs" if lay.pp > 1 else ""),
        *([_row("  of which router logits/scores (fp32)", p.router_logits),
           _row("MoE dispatcher (alltoall send + recv, one layer)", p.dispatcher)] if moe else []),
        _row(f"logits ({'fused' if s.fused_logits else 'naive'}, response rows"
             f"{', last stage only' if lay.pp > 1 else ''})", p.logits,
             f"fused {p.logits_fused / GiB:.2f} | naive {p.logits_naive / GiB:.2f}"),
        _row("overhead (CUDA context, NCCL, allocator)", p.overhead),
        _row("TOTAL train", p.train_peak),
        "rollout phase" + (" (same GPUs: resident actor + SGLang pool)" if lay.colocate else " (rollout GPUs)"),
        _row(f"actor state kept ({s.actor_in_rollout})", p.actor_resident if lay.colocate else 0),
        _row(f"SGLang static pool ({lay.mem_fraction_static:.2f} x H100)", p.sglang_weights + p.kv_pool),
        _row("  of which weights (bf16 / sglang_tp)", p.sglang_weights),
        _row("  of which KV cache", p.kv_pool,
             f"{p.kv_tokens} tokens = {p.kv_tokens // max(s.seq_len, 1)} x {s.seq_len}-token sequences"),
        _row("overhead", p.overhead),
        _row("TOTAL rollout", p.rollout_peak),
    ]
    verdict = []
    for gpu, cap_g in GPU_CAPACITY.items():
        name = {"h100": "H100 80GB", "h200": "H200 141GB"}[gpu]
        verdict.append(f"{name}: {'FITS' if p.fits[gpu] else 'does NOT fit'} (usable {usable_frac * cap_g / GiB:.1f} GiB)")
    lines.append("verdict: " + "; ".join(verdict))
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def plan_to_dict(p: MemoryPlan) -> dict[str, Any]:
    """JSON-ready dict of a plan (bytes)."""
    return dataclasses.asdict(p)


def _load_recipe(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise PlanError(f"--config {path}: file not found")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def settings_from_recipe(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Layout kwargs, TrainSettings kwargs) from a training YAML's actor/rollout/data sections."""
    a, r, d = cfg.get("actor", {}) or {}, cfg.get("rollout", {}) or {}, cfg.get("data", {}) or {}
    cp = int(a.get("context_parallel_size", 1))
    resp_len = int(r.get("max_new_tokens", 64))
    seq = int(d.get("max_prompt_len", 512)) + resp_len
    mtpg = a.get("max_tokens_per_gpu")
    tokens = int(mtpg) * cp if mtpg else int(a.get("micro_batch_size", 1)) * seq
    # logit rows = response tokens; a micro-batch of full-length samples holds max_new_tokens / seq of its tokens
    resp_tokens = -(-tokens * resp_len // seq)
    # defaults are ActorConfig's (sequence_parallel off; the distributed optimizer on with a GPU)
    lay = dict(tp=int(a.get("tensor_model_parallel_size", 1)), pp=int(a.get("pipeline_model_parallel_size", 1)),
               cp=cp, sequence_parallel=bool(a.get("sequence_parallel", False)),
               sglang_tp=int(r.get("sglang_tp", 1)), mem_fraction_static=float(r.get("mem_fraction_static", 0.7)),
               colocate=bool(r.get("colocate", True)), ep=int(a.get("expert_model_parallel_size", 1) or 1),
               etp=a.get("expert_tensor_parallel_size"))
    dist_opt = a.get("use_distributed_optimizer")
    st = dict(tokens_per_microbatch=tokens, seq_len=seq, recompute=str(a.get("recompute", "none")),
              recompute_method=str(a.get("recompute_method", "uniform")),
              recompute_num_layers=int(a.get("recompute_num_layers", 1)),
              response_tokens_per_microbatch=resp_tokens,
              overlap_grad_reduce=bool(a.get("overlap_grad_reduce", True)),
              grad_reduce_bucket_size=a.get("grad_reduce_bucket_size"),
              use_distributed_optimizer=True if dist_opt is None else bool(dist_opt),
              optimizer_cpu_offload=bool(a.get("optimizer_cpu_offload", False)),
              fused_logits=bool(a.get("use_fused_kernels", True)),
              param_dtype="bf16" if a.get("bf16", False) else "fp32",
              moe_aux_loss=float(a.get("moe_aux_loss_coef", 0.0) or 0.0) > 0)
    return lay, st


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rfpo-megatron plan", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help=f"preset ({', '.join(PRESETS)}), HF config.json or model dir")
    ap.add_argument("--config", help="training YAML: layout/batch settings are read from actor/rollout/data")
    ap.add_argument("--gpus", type=int, help="recommend layouts for this many GPUs (instead of planning one)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", choices=sorted(GPU_CAPACITY), default="h100", help="GPU kind for --gpus")
    for k in ("tp", "pp", "dp", "cp", "sglang-tp", "ep", "etp"):
        ap.add_argument(f"--{k}", type=int)
    ap.add_argument("--mem-fraction", type=float, help="SGLang mem_fraction_static")
    ap.add_argument("--no-sp", action="store_true", help="sequence parallel off")
    ap.add_argument("--disaggregated", action="store_true", help="SGLang on separate GPUs (no colocation)")
    ap.add_argument("--tokens-per-microbatch", type=int, help="packed tokens per micro-batch (before CP split)")
    ap.add_argument("--seq-len", type=int, help="longest sequence, prompt + response")
    ap.add_argument("--num-microbatches", type=int)
    ap.add_argument("--recompute", choices=RECOMPUTE_MODES)
    ap.add_argument("--offload", action="store_true", help="Adam state on the CPU (optimizer_cpu_offload)")
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    ap.add_argument("--grad-dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--param-dtype", choices=("bf16", "fp32"), help="default bf16 (or actor.bf16 of --config)")
    ap.add_argument("--logits", choices=("fused", "naive"))
    ap.add_argument("--attention", choices=("flash", "unfused"), default="flash")
    ap.add_argument("--actor-in-rollout", choices=ACTOR_IN_ROLLOUT, default="resident")
    ap.add_argument("--overhead-gib", type=float, default=4.0)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """`rfpo-megatron plan ...`: print a memory plan, or recommended layouts with --gpus."""
    args = build_parser().parse_args(argv)
    try:
        m = shape_from_hf(args.model)
        lay_kw: dict[str, Any] = {}
        st_kw: dict[str, Any] = {}
        if args.config:
            lay_kw, st_kw = settings_from_recipe(_load_recipe(args.config))
        for k, v in (("tp", args.tp), ("pp", args.pp), ("dp", args.dp), ("cp", args.cp),
                     ("sglang_tp", args.sglang_tp), ("mem_fraction_static", args.mem_fraction),
                     ("ep", args.ep), ("etp", args.etp)):
            if v is not None:
                lay_kw[k] = v
        if args.no_sp:
            lay_kw["sequence_parallel"] = False
        if args.disaggregated:
            lay_kw["colocate"] = False
        for k, v in (("tokens_per_microbatch", args.tokens_per_microbatch), ("seq_len", args.seq_len),
                     ("num_microbatches", args.num_microbatches), ("recompute", args.recompute)):
            if v is not None:
                st_kw[k] = v
        if args.offload:
            st_kw["optimizer_cpu_offload"] = True
        if args.no_distributed_optimizer:
            st_kw["use_distributed_optimizer"] = False
        if args.logits:
            st_kw["fused_logits"] = args.logits == "fused"
        if args.param_dtype:
            st_kw["param_dtype"] = args.param_dtype
        st_kw.update(grad_fp32=args.grad_dtype == "fp32", flash_attention=args.attention == "flash",
                     actor_in_rollout=args.actor_in_rollout, overhead_gib=args.overhead_gib)
        if "seq_len" in st_kw and "tokens_per_microbatch" not in st_kw:
            st_kw["tokens_per_microbatch"] = st_kw["seq_len"]
        settings = TrainSettings(**st_kw)
        if args.gpus:
            plans = recommend(m, args.gpus, settings, gpu=args.gpu, gpus_per_node=args.gpus_per_node,
                              mem_fraction_static=lay_kw.get("mem_fraction_static"),
                              sglang_tp=lay_kw.get("sglang_tp"), colocate=lay_kw.get("colocate", True))
            if args.json:
                print(json.dumps([plan_to_dict(p) for p in plans], indent=1))
            elif not plans:
                print(f"no layout of {args.gpus} x {args.gpu} fits {m.name} with these settings "
                      "(try more GPUs, shorter tokens/micro-batch, --actor-in-rollout offloaded)")
            else:
                print(f"recommended layouts for {m.name} on {args.gpus} x {args.gpu.upper()} (best first):")
                for i, p in enumerate(plans):
                    print(f"\n#{i + 1}: " + format_plan(p))
            return 0 if plans else 1
        lay = Layout(**lay_kw)
        p = plan_memory(m, lay, settings)
        print(json.dumps(plan_to_dict(p), indent=1) if args.json else format_plan(p))
        return 0
    except PlanError as e:
        print(f"rfpo-megatron plan: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
