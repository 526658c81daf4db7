"""Weight sync actor -> rollout engine: HF-named tensors in buckets, over HTTP or a trainer -> servers group.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from rfpo_megatron.config import Config, ConfigError
from rfpo_megatron.train.runtime import Runtime, barrier


def sync_weights(rt: Runtime, resume_memory: bool = False) -> None:
    """Push the actor's weights to the rollout engine as HF-named tensors, in buckets
    (rollout.weight_sync_bucket_mb). Collective over TP (gathers shards); with PP each stage pushes its own
    layers; only TP rank 0 / DP rank 0 of each stage talks to the engine. `resume_memory`: the engine
    released its memory (rollout.colocate): re-allocate the weights first, the KV cache after."""
    from rfpo_megatron.convert.export import iter_hf_weights

    if resume_memory and rt.is_rank0:
        rt.engine.resume_memory(["weights"])
    barrier(rt)
    bucket_bytes = int(rt.cfg.rollout.weight_sync_bucket_mb) * (1 << 20)
    sender = rt.engine is not None and _is_sync_sender()
    distributed = sync_mode(rt.cfg) == "distributed"
    if distributed and rt.is_rank0 and rt.weight_group is None:
        rt.weight_group = connect_weight_group(rt)
    for bucket in iter_hf_weights(rt.actor.modules, rt.actor.hf_config, bucket_bytes):
        if sender and distributed:
            rt.engine.push_weights_distributed(rt.weight_group, list(bucket), flush_cache=False)
        elif sender:
            rt.engine.update_weights_from_tensors(list(bucket), flush_cache=False)
    barrier(rt)
    if rt.is_rank0 and rt.engine is not None:
        if resume_memory:
            rt.engine.resume_memory(["kv_cache"])
        rt.engine.flush_cache()


def sync_mode(cfg: Config) -> str:
    """rollout.weight_sync resolved: `tensor` (HTTP, colocated or CPU) or `distributed` (a NCCL/gloo group
    trainer -> servers, for servers on other nodes). `auto` = distributed when not colocated and PP = 1."""
    mode = cfg.rollout.weight_sync
    pp = cfg.actor.pipeline_model_parallel_size
    if mode == "auto":
        return "distributed" if (not cfg.rollout.colocate and pp == 1) else "tensor"
    if mode == "distributed" and pp > 1:
        raise ConfigError("rollout.weight_sync=distributed needs actor.pipeline_model_parallel_size=1 (the update "
                          "group's sender is rank 0); use weight_sync=tensor with pipeline parallelism")
    if mode == "disk":
        raise ConfigError("rollout.weight_sync=disk is not wired in the trainer; use tensor or distributed")
    return mode


def connect_weight_group(rt: Runtime) -> Any:
    """Rank 0 creates the weight-update group with the servers (gloo on CPU, nccl on GPU); its address is
    RFPO_WEIGHT_SYNC_ADDR, else MASTER_ADDR (the first node), on a free port."""
    from rfpo_megatron.rollout.procs import free_port

    addr = os.environ.get("RFPO_WEIGHT_SYNC_ADDR") or os.environ.get("MASTER_ADDR", "127.0.0.1")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    group = rt.engine.connect_weights_update_group(addr, free_port(), backend=backend,
                                                   timeout_s=rt.cfg.rollout.startup_timeout_s)
    rt.cleanup.insert(0, lambda: rt.engine.destroy_weights_update_group(group))
    return group


def share_engine(rt: Runtime) -> None:
    """Rank 0 launched the engine; the other weight-sync senders (first TP/DP rank of each later pipeline
    stage) get a client of the same servers (not owning them: they never shut them down)."""
    if rt.world_size == 1:
        return
    import torch.distributed as dist

    from rfpo_megatron.rollout.client import EngineClient

    box = [(rt.engine.url, rt.engine.worker_urls) if rt.is_rank0 else None]
    dist.broadcast_object_list(box, src=0)
    if not rt.is_rank0 and _is_sync_sender():
        url, workers = box[0]
        rt.engine = EngineClient(url, workers, request_timeout_s=rt.cfg.rollout.request_timeout_s)


def _is_sync_sender() -> bool:
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_data_parallel_rank() == 0
