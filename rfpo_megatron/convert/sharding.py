"""TP sharding and PP renumbering of megatron-core parameters: pure split/merge rules plus gather/load on live models.

Canonical names (see `mapping.py`) are local-spec names with GLOBAL 0-based layer numbers. A live model
may use TE names (the input/pre-MLP layernorms fused into ``linear_qkv.layer_norm_weight`` /
``linear_fc1.layer_norm_weight``) and LOCAL layer numbers per PP stage / virtual chunk; both are
translated here.

How megatron-core shards each parameter over TP (`tp_kind`):

- ``vocab``: embedding / output_layer rows, padded to `padded_vocab` then split into contiguous rows.
- ``col``:   ColumnParallelLinear (linear_qkv weight/bias): contiguous rows of the (group-interleaved)
             tensor; this holds also when num_query_groups < TP (megatron all-gathers and slices).
- ``glu``:   linear_fc1 of SwiGLU: rank r holds cat(gate[r-th F/tp rows], up[r-th F/tp rows]).
- ``row``:   RowParallelLinear weight (linear_proj, linear_fc2): contiguous columns (dim 1).
- ``rep``:   replicated (layernorms, row-parallel biases, the MoE router).

MoE experts (``mlp.experts.local_experts.{k}.linear_fc1/fc2``) split like ``glu`` / ``row`` but over the
EXPERT tensor-parallel group (``expert_tensor_parallel_size``), and the experts themselves are distributed over
the expert-parallel group: EP rank r holds the E/EP experts r·E/EP … (r+1)·E/EP − 1 under local numbers k.
Canonical names carry the global expert number (`to_canonical`); `iter_full_params` gathers experts over EP.
"""
from __future__ import annotations

import re
from typing import Iterator, Mapping, Sequence

import torch

from rfpo_megatron.convert.arch import ConversionError

TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
LOCAL_TO_TE = {v: k for k, v in TE_TO_LOCAL.items()}
VOCAB_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def is_expert(name: str) -> bool:
    """True for a (canonical or local) expert parameter of a MoE layer (split over expert TP, spread over EP)."""
    m = _LAYER_RE.match(name)
    return bool(m and _EXPERT_RE.match(m.group(2)))


def tp_kind(name: str) -> str:
    """How a canonical (or TE) megatron parameter is split over TP: vocab | col | glu | row | rep."""
    if name in VOCAB_NAMES:
        return "vocab"
    m = _LAYER_RE.match(name)
    suffix = m.group(2) if m else name
    if suffix in TE_TO_LOCAL or suffix in LOCAL_TO_TE:
        return "rep"
    if suffix.startswith("self_attention.linear_qkv."):
        return "col"
    e = _EXPERT_RE.match(suffix)
    if e:
        suffix = "mlp." + e.group(2)  # an expert's linears split as the dense MLP's (over expert TP)
    if suffix.startswith("mlp.linear_fc1."):
        return "glu"
    if suffix in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return "row"
    return "rep"


def shard_tp(name: str, full: torch.Tensor, tp: int, rank: int, *, padded_vocab: int | None = None) -> torch.Tensor:
    """The shard TP rank `rank` holds of a full tensor (a contiguous copy).

    full: [rows, ...] TP = 1 tensor; vocab tensors ([V, h] or already padded [Vp, h]) are
    zero-padded to `padded_vocab` rows first. Result: e.g. [Vp/tp, h], [qkv_rows/tp, h], [h, F/tp].
    """
    kind = tp_kind(name)
    if kind == "vocab":
        if padded_vocab is None:
            raise ValueError(f"shard_tp({name}): padded_vocab is required for vocab tensors")
        full = pad_vocab(name, full, padded_vocab)
    if kind == "rep":
        return full.clone()
    if kind in ("vocab", "col", "row"):
        dim = 1 if kind == "row" else 0
        size = full.shape[dim]
        if size % tp:
            raise ConversionError(f"'{name}': dim {dim} of size {size} is not divisible by TP={tp}")
        return full.narrow(dim, rank * (size // tp), size // tp).clone().contiguous()
    # glu: the gate and up halves are each split; a rank holds cat(its gate rows, its up rows)
    gate, up = torch.chunk(full, 2, dim=0)
    f = gate.shape[0]
    if f % tp:
        raise ConversionError(f"'{name}': intermediate_size {f} is not divisible by TP={tp}")
    n = f // tp
    return torch.cat([gate[rank * n : (rank + 1) * n], up[rank * n : (rank + 1) * n]], 0).contiguous()


def split_tp(name: str, full: torch.Tensor, tp: int, *, padded_vocab: int | None = None) -> list[torch.Tensor]:
    """Full tensor → all `tp` shards (index = TP rank); see `shard_tp`."""
    return [shard_tp(name, full, tp, r, padded_vocab=padded_vocab) for r in range(tp)]


def merge_tp(name: str, shards: Sequence[torch.Tensor], *, vocab_size: int | None = None) -> torch.Tensor:
    """Inverse of `split_tp`: TP shards (index = TP rank) → full tensor; vocab rows cut to `vocab_size` if given."""
    kind = tp_kind(name)
    if kind == "rep":
        return shards[0]
    if kind in ("vocab", "col", "row"):
        full = torch.cat(list(shards), dim=1 if kind == "row" else 0) if len(shards) > 1 else shards[0]
        if kind == "vocab" and vocab_size is not None:
            if full.shape[0] < vocab_size:
                raise ConversionError(f"'{name}' has {full.shape[0]} rows, fewer than vocab_size={vocab_size}")
            full = full[:vocab_size]
        return full.contiguous()
    halves = [torch.chunk(s, 2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0).contiguous()


def pad_vocab(name: str, full: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """[V, h] → [padded_vocab, h] with zero rows appended; error if V > padded_vocab."""
    rows = full.shape[0]
    if rows > padded_vocab:
        raise ConversionError(
            f"'{name}' has {rows} rows but the model holds {padded_vocab}; pass vocab_size to strip padding"
        )
    if rows == padded_vocab:
        return full
    pad = full.new_zeros((padded_vocab - rows, *full.shape[1:]))
    return torch.cat([full, pad], dim=0)


# ---- live models: names, renumbering -------------------------------------------------------------


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (`.module`) down to the GPTModel."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def canonical_params(model_chunks: Sequence[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Yield (canonical global name, parameter) of this rank's chunks (local layer j → layer_number - 1,
    local expert k → ep_rank · E/EP + k)."""
    for chunk in model_chunks:
        model = unwrap(chunk)
        layers = model.decoder.layers if hasattr(model, "decoder") else []
        offsets = [int(layer.layer_number) - 1 for layer in layers]
        first_expert = _ep_info(model)[3]
        for name, param in model.named_parameters():
            yield to_canonical(name, offsets, first_expert), param


def to_canonical(name: str, global_index: Sequence[int], first_expert: int = 0) -> str:
    """Local/TE name of a chunk → canonical name; global_index[j] is the global number of local layer j,
    first_expert the global number of this rank's local expert 0."""
    m = _LAYER_RE.match(name)
    if not m:
        return name
    j, suffix = int(m.group(1)), m.group(2)
    e = _EXPERT_RE.match(suffix)
    if e:
        suffix = f"mlp.experts.local_experts.{first_expert + int(e.group(1))}.{e.group(2)}"
    return f"decoder.layers.{global_index[j]}.{TE_TO_LOCAL.get(suffix, suffix)}"


def expert_name(name: str, expert: int) -> str:
    """A canonical expert name with its expert number replaced by `expert`."""
    m = _LAYER_RE.match(name)
    e = _EXPERT_RE.match(m.group(2)) if m else None
    if e is None:
        raise ValueError(f"'{name}' is not an expert parameter")
    return f"decoder.layers.{m.group(1)}.mlp.experts.local_experts.{expert}.{e.group(2)}"


def _tp_info(expert: bool = False) -> tuple[int, int, object]:
    """(size, rank, group) of the group a parameter is TP-split over: TP, or expert TP for experts."""
    from megatron.core import parallel_state as ps

    if expert:
        return (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank(),
                ps.get_expert_tensor_parallel_group())
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()


def _ep_info(model: torch.nn.Module) -> tuple[int, int, object, int]:
    """(EP size, EP rank, EP group, global number of local expert 0) for a GPTModel; (1, 0, None, 0) when dense."""
    n_exp = getattr(getattr(model, "config", None), "num_moe_experts", None)
    if not n_exp:
        return 1, 0, None, 0
    from megatron.core import parallel_state as ps

    ep, r = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    return ep, r, ps.get_expert_model_parallel_group(), r * (n_exp // ep)


def _check_param_attrs(name: str, param: torch.Tensor, kind: str, tp: int) -> None:
    """Cross-check our name rule with megatron's own TP attributes on the parameter."""
    if tp == 1:
        return
    is_tp = bool(getattr(param, "tensor_model_parallel", False))
    dim = getattr(param, "partition_dim", -1)
    want = {"rep": (False, None), "row": (True, 1)}.get(kind, (True, 0))
    if is_tp != want[0] or (is_tp and dim != want[1]):
        raise RuntimeError(f"'{name}': megatron marks tensor_model_parallel={is_tp}, partition_dim={dim}; rule is {kind}")


def iter_full_params(
    model_chunks: Sequence[torch.nn.Module], *, vocab_size: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical global name, full TP = 1 tensor) for every parameter of this rank's PP stage.

    Collective over the TP group (and, for MoE, the expert TP and EP groups): those ranks must iterate in
    lockstep; each gets the same tensors. Experts are yielded once per EP rank's block (global numbers).
    Gathers one parameter at a time (memory: one full tensor). Vocab tensors are cut to
    `vocab_size` rows when given, else keep the padded rows [Vp, h].
    """
    import torch.distributed as dist

    ep, _, ep_group, _ = _ep_info(unwrap(model_chunks[0])) if model_chunks else (1, 0, None, 0)
    n_local = (unwrap(model_chunks[0]).config.num_moe_experts or 0) // ep if model_chunks else 0
    for name, param in canonical_params(model_chunks):
        kind = tp_kind(name)
        expert = is_expert(name)
        tp, _, group = _tp_info(expert)
        _check_param_attrs(name, param, kind, tp)
        local = param.detach()
        if kind == "rep" or tp == 1:
            shards = [local]
        else:
            local = local.contiguous()
            shards = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(shards, local, group=group)
        full = merge_tp(name, shards, vocab_size=vocab_size)
        if not expert or ep == 1:
            yield name, full
            continue
        # every EP rank holds the same local expert k of a different block of experts
        full = full.contiguous()
        parts = [torch.empty_like(full) for _ in range(ep)]
        dist.all_gather(parts, full, group=ep_group)
        k = int(_EXPERT_RE.match(_LAYER_RE.match(name).group(2)).group(1)) % n_local
        for r, part in enumerate(parts):
            yield expert_name(name, r * n_local + k), part


def gather_full_state(model_chunks: Sequence[torch.nn.Module], *, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Full TP = 1 canonical tensors of this PP stage, GLOBAL layer numbers (collective over TP).

    Vocab tensors: [vocab_size, h] if given, else the padded [Vp, h].
    """
    return dict(iter_full_params(model_chunks, vocab_size=vocab_size))


def load_full_state(
    model_chunks: Sequence[torch.nn.Module], full_state: Mapping[str, torch.Tensor], *, vocab_size: int | None = None
) -> None:
    """Copy this rank's TP shard of each parameter from `full_state` (canonical names, global layers).

    full_state may hold the whole model or just this stage; vocab tensors may be padded or not (they
    are cut to `vocab_size` rows if given, then zero-padded to the model's rows). A tied model's last
    PP stage takes output_layer.weight from embedding.word_embeddings.weight when the former is absent.
    Raises ConversionError listing every missing or shape-mismatched tensor (nothing is loaded then).
    """
    plan: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    problems: list[str] = []
    for name, param in canonical_params(model_chunks):
        tp, rank, _ = _tp_info(is_expert(name))
        src_name = name
        if name not in full_state and name == "output_layer.weight" and "embedding.word_embeddings.weight" in full_state:
            src_name = "embedding.word_embeddings.weight"
        if src_name not in full_state:
            problems.append(f"missing tensor '{name}'")
            continue
        full = full_state[src_name]
        kind = tp_kind(name)
        try:
            if kind == "vocab":
                if vocab_size is not None:
                    full = full[:vocab_size]
                shard = shard_tp(name, full, tp, rank, padded_vocab=param.shape[0] * tp)
            else:
                shard = shard_tp(name, full, tp, rank)
        except ConversionError as err:
            problems.append(str(err))
            continue
        if shard.shape != param.shape:
            problems.append(f"tensor '{name}': full shape {list(full.shape)} gives TP shard {list(shard.shape)}, model has {list(param.shape)}")
            continue
        plan.append((param, shard))
    if problems:
        raise ConversionError("cannot load weights into the model:\n  - " + "\n  - ".join(problems))
    with torch.no_grad():
        for param, shard in plan:
            param.copy_(shard.to(dtype=param.dtype, device=param.device))
