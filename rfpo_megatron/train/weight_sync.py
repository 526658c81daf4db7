"""Weight sync actor -> rollout engine: HF-named tensors in buckets, over HTTP or a trainer -> servers group,
or an HF safetensors directory on a shared filesystem that the engine loads (rollout.weight_sync=disk).
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from rfpo_megatron.config import Config, ConfigError
from rfpo_megatron.train.runtime import Runtime, barrier


def sync_weights(rt: Runtime, resume_memory: bool = False) -> None:
    """Push the actor's weights to the rollout engine as HF-named tensors, in buckets
    (rollout.weight_sync_bucket_mb). Collective over TP (gathers shards); with PP each stage pushes its own
    layers; only TP rank 0 / DP rank 0 of each stage talks to the engine. `disk`: every rank writes its part
    of one HF directory (`write_weights_dir`), then rank 0 alone asks the engine to load it. `resume_memory`:
    the engine released its memory (rollout.colocate): re-allocate the weights first, the KV cache after."""
    from rfpo_megatron.convert.export import iter_hf_weights

    if resume_memory and rt.is_rank0:
        rt.engine.resume_memory(["weights"])
    barrier(rt)
    bucket_bytes = int(rt.cfg.rollout.weight_sync_bucket_mb) * (1 << 20)
    sender = rt.engine is not None and _is_sync_sender()
    mode = sync_mode(rt.cfg)
    if mode == "disk":
        path = write_weights_dir(rt, bucket_bytes)
        if rt.is_rank0 and rt.engine is not None:
            rt.engine.update_weights_from_disk(path)
            _remove_old_dirs(os.path.dirname(path), keep=os.path.basename(path))
    else:
        if mode == "distributed" and rt.is_rank0 and rt.weight_group is None:
            rt.weight_group = connect_weight_group(rt)
        for bucket in iter_hf_weights(rt.actor.modules, rt.actor.hf_config, bucket_bytes):
            if sender and mode == "distributed":
                rt.engine.push_weights_distributed(rt.weight_group, list(bucket), flush_cache=False)
            elif sender:
                rt.engine.update_weights_from_tensors(list(bucket), flush_cache=False)
    barrier(rt)
    if rt.is_rank0 and rt.engine is not None:
        if resume_memory:
            rt.engine.resume_memory(["kv_cache"])
        rt.engine.flush_cache()


def sync_mode(cfg: Config) -> str:
    """rollout.weight_sync resolved: `tensor` (HTTP, colocated or CPU), `distributed` (a NCCL/gloo group
    trainer -> servers, for servers on other nodes) or `disk` (an HF directory on a filesystem the servers
    share, `weight_sync_dir`). `auto` = distributed when not colocated and PP = 1, else tensor."""
    mode = cfg.rollout.weight_sync
    pp = cfg.actor.pipeline_model_parallel_size
    if mode == "auto":
        return "distributed" if (not cfg.rollout.colocate and pp == 1) else "tensor"
    if mode == "distributed" and pp > 1:
        raise ConfigError("rollout.weight_sync=distributed needs actor.pipeline_model_parallel_size=1 (the update "
                          "group's sender is rank 0); use weight_sync=tensor with pipeline parallelism")
    return mode


def weight_sync_dir(cfg: Config) -> str:
    """rollout.weight_sync_dir (default <trainer.save_dir>/weight_sync) as an absolute path (the engine gets it)."""
    return os.path.abspath(cfg.rollout.weight_sync_dir or os.path.join(cfg.trainer.save_dir, "weight_sync"))


def write_weights_dir(rt: Runtime, shard_bytes: int) -> str:
    """Write the actor's weights as an HF safetensors directory <weight_sync_dir>/sync_NNNNNN and return it.

    Collective over all ranks (`convert.export.save_hf`: TP shards gathered as in iter_hf_weights, each
    pipeline stage's first TP/DP rank writes its own layers, global rank 0 the index and config.json). It is
    written as `sync_NNNNNN.tmp` and renamed by rank 0 once every rank is done, so an engine never sees a
    half-written directory. The directory must be on a filesystem every rank and the engine see."""
    from rfpo_megatron.convert.export import save_hf

    rt.weight_syncs += 1
    final = os.path.join(weight_sync_dir(rt.cfg), f"sync_{rt.weight_syncs:06d}")
    tmp = final + ".tmp"
    if rt.is_rank0:  # leftovers of an earlier process (e.g. before a resume)
        for p in (tmp, final):
            shutil.rmtree(p, ignore_errors=True)
        os.makedirs(os.path.dirname(final), exist_ok=True)
    barrier(rt)
    save_hf(rt.actor.modules, rt.actor.hf_config, tmp, source_dir=rt.cfg.actor.hf_model_path,
            max_shard_bytes=shard_bytes)  # ends with a barrier: every shard is written
    if rt.is_rank0:
        os.replace(tmp, final)
    return final


def _remove_old_dirs(root: str, keep: str) -> None:
    """Delete the weight-sync directories in `root` other than `keep` (the engine has loaded `keep`)."""
    for name in os.listdir(root):
        if name.startswith("sync_") and name != keep:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


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
