"""Loading HF weights straight into a live TP/PP megatron model: each rank reads only its own slices from disk.

`read_hf_shard` computes one TP rank's shard of a megatron parameter from the HF tensors with
safetensors slicing (rows for column-parallel/vocab/GLU, columns for row-parallel, whole KV groups for
the fused QKV), so a rank of a TP = 8 job reads about 1/8 of its stage's weights. It equals
`sharding.shard_tp(name, mapping.hf_to_mcore_tensor(...), tp, rank)` (tested); the one case it reads
whole tensors is linear_qkv with num_key_value_heads < TP. A MoE rank reads only its own experts (EP) and
their expert-TP slices.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from rfpo_megatron.convert.arch import Arch, ConversionError, arch_from_hf_config
from rfpo_megatron.convert.hf_io import HFReader, read_hf_config
from rfpo_megatron.convert.mapping import Rule, check_hf_tensors, fuse_qkv, hf_to_mcore_tensor, rule_for_mcore
from rfpo_megatron.convert.sharding import canonical_params, is_expert, pad_vocab, shard_tp, tp_kind
from rfpo_megatron.convert.validate import model_diffs, require_no_diffs


def read_hf_shard(arch: Arch, rule: Rule, reader: HFReader, tp: int, rank: int, *, padded_vocab: int | None = None) -> torch.Tensor:
    """TP rank `rank`'s shard of megatron parameter `rule.mcore` ([rows/tp, h], [h, cols/tp], … as in shard_tp)."""
    kind = tp_kind(rule.mcore)
    if tp == 1 or kind == "rep":
        full = hf_to_mcore_tensor(arch, rule, [reader.get(n) for n in rule.hf])
        return shard_tp(rule.mcore, full, tp, rank, padded_vocab=padded_vocab)
    name = rule.hf[0]
    if kind == "vocab":
        if padded_vocab is None or padded_vocab % tp:
            raise ValueError(f"read_hf_shard({rule.mcore}): padded_vocab divisible by tp is required")
        n = padded_vocab // tp
        lo, hi = rank * n, min((rank + 1) * n, arch.vocab_size)
        part = reader.get_part(name, rows=(lo, hi)) if lo < hi else reader.get_part(name, rows=(0, 0))
        return pad_vocab(rule.mcore, part, n).contiguous()
    if kind == "row":
        cols = rule.mcore_shape[1]
        if cols % tp:
            raise ConversionError(f"'{rule.mcore}': dim 1 of size {cols} is not divisible by TP={tp}")
        c = cols // tp
        return reader.get_part(name, cols=(rank * c, (rank + 1) * c)).contiguous()
    if kind == "glu":
        F = rule.hf_shapes[0][0]  # intermediate_size, or moe_intermediate_size for an expert
        if F % tp:
            raise ConversionError(f"'{rule.mcore}': {rule.fields.split(',')[0]} {F} is not divisible by TP={tp}")
        n = F // tp
        gate, up = (reader.get_part(h, rows=(rank * n, (rank + 1) * n)) for h in rule.hf)
        return torch.cat([gate, up], 0).contiguous()
    # col: fused QKV; a rank holds whole KV groups when num_key_value_heads is a multiple of TP
    ng, d = arch.num_kv_heads, arch.head_dim
    if ng % tp:
        full = hf_to_mcore_tensor(arch, rule, [reader.get(n) for n in rule.hf])
        return shard_tp(rule.mcore, full, tp, rank)
    per = arch.num_heads // ng
    g0, g1 = rank * ng // tp, (rank + 1) * ng // tp
    q = reader.get_part(rule.hf[0], rows=(g0 * per * d, g1 * per * d))
    k = reader.get_part(rule.hf[1], rows=(g0 * d, g1 * d))
    v = reader.get_part(rule.hf[2], rows=(g0 * d, g1 * d))
    return fuse_qkv(q, k, v, (g1 - g0) * per, g1 - g0)


def load_hf_into_model(model_chunks: Sequence[torch.nn.Module], hf_dir: str | os.PathLike) -> Arch:
    """Load an HF directory into this rank's chunks (any TP/PP; no collectives; only this rank's slices read).

    The HF config is checked against the model first and every tensor against the config (fields and
    names in the message); nothing is copied unless every parameter's shard is found with the right shape.
    """
    from megatron.core import parallel_state as ps

    cfg = read_hf_config(hf_dir)
    arch = arch_from_hf_config(cfg, where=str(Path(hf_dir) / "config.json"))
    for chunk in model_chunks:
        require_no_diffs(model_diffs(arch, chunk), what=f"{hf_dir} does not match the model")
    reader = HFReader(hf_dir)
    check_hf_tensors(arch, reader.shapes(), source=str(hf_dir))
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    etp, erank = (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()) if arch.is_moe else (1, 0)
    plan: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    problems: list[str] = []
    for name, param in canonical_params(model_chunks):
        src = "embedding.word_embeddings.weight" if name == "output_layer.weight" and arch.tie_embeddings else name
        rule = rule_for_mcore(arch, src)
        padded = param.shape[0] * tp if tp_kind(name) == "vocab" else None
        t, r = (etp, erank) if is_expert(name) else (tp, rank)  # experts split over expert TP; EP picks the expert
        shard = read_hf_shard(arch, rule, reader, t, r, padded_vocab=padded)
        if shard.shape != param.shape:
            problems.append(f"'{name}': HF gives TP shard {list(shard.shape)}, the model has {list(param.shape)}")
            continue
        plan.append((param, shard))
    require_no_diffs(problems, what=f"cannot load {hf_dir} into the model")
    with torch.no_grad():
        for param, shard in plan:
            param.copy_(shard.to(dtype=param.dtype, device=param.device))
    return arch
