"""HF-named full weights out of a live (TP/PP-sharded) megatron model, in buckets: the rollout weight-sync source.

`iter_hf_weights` is collective over the TP group (every TP rank of a stage must iterate it in
lockstep and gets the same tensors; for MoE also over the expert TP and EP groups, and experts come out under
the checkpoint's per-expert names ``model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight``); each PP stage yields only its own layers (stage 0 also the
embedding, the last stage the final norm and lm_head). It uses the same mapping as the to-HF tool
(`mapping.mcore_to_hf_tensors`), so the union over PP stages equals the tool's output tensor for
tensor. A tied model's last-stage copy of the embedding is not yielded (HF has no lm_head then).
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import torch

from rfpo_megatron.convert.arch import arch_from_hf_config
from rfpo_megatron.convert.mapping import rule_or_tied_head, mcore_to_hf_tensors
from rfpo_megatron.convert.sharding import iter_full_params


def iter_hf_tensors(model_chunks: Sequence[torch.nn.Module], hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for this PP stage, one megatron parameter gathered at a time.

    Tensors are on the parameters' device in their dtype; vocab rows are cut to vocab_size ([V, h]).
    """
    arch = arch_from_hf_config(hf_config)
    for name, full in iter_full_params(model_chunks, vocab_size=arch.vocab_size):
        rule = rule_or_tied_head(arch, name)
        if rule is None:
            continue
        yield from mcore_to_hf_tensors(arch, rule, full)


def iter_hf_weights(
    model_chunks: Sequence[torch.nn.Module], hf_config: Any, bucket_bytes: int = 512 * 1024**2
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of (HF name, full tensor) of at most ~bucket_bytes each (a larger tensor gets its own bucket).

    Collective over TP (see module docstring). Memory: one bucket plus one gathered parameter.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in iter_hf_tensors(model_chunks, hf_config):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def save_hf(
    model_chunks: Sequence[torch.nn.Module],
    hf_config: Any,
    out_dir: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Write the live model as an HF directory (collective over ALL ranks; shared filesystem).

    Every PP stage's TP-rank-0 / DP-rank-0 process streams its stage's tensors (from `iter_hf_weights`,
    so exactly the to-HF tool's tensors) into its own shards; global rank 0 then names the shards,
    writes the index, config.json (from `hf_config`) and copies generation/tokenizer files from
    `source_dir`. Works for any checkpoint format, including megatron dist checkpoints on GPU.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from rfpo_megatron.convert.hf_io import HFWriter, copy_aux_files, finalize_shards, write_hf_config

    cfg = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    pieces: list = []
    writes = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    # MoE: the EP group spans data-parallel ranks, so every rank joins the expert gathers (DP rank 0 writes)
    if ps.get_data_parallel_rank() == 0 or ps.get_expert_model_parallel_world_size() > 1:
        writer = HFWriter(out_dir, max_shard_bytes=max_shard_bytes, prefix=f"pp{pp_rank:03d}-") if writes else None
        for bucket in iter_hf_weights(model_chunks, cfg, bucket_bytes=max_shard_bytes):
            if writer is not None:
                writer.add_many(bucket)
        if writer is not None:
            pieces = [(pp_rank, *p) for p in writer.finish()]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, pieces)
    if dist.get_rank() == 0:
        ordered = sorted((p for part in everyone for p in part), key=lambda p: (p[0], p[1]))
        finalize_shards(out_dir, [p[1:] for p in ordered])
        write_hf_config(out_dir, cfg)
        if source_dir is not None:
            copy_aux_files(source_dir, out_dir)
    dist.barrier()
