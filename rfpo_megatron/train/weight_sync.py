"""Weight sync actor -> rollout engine: HF-named tensors in buckets, over HTTP or a trainer -> servers group,
or an HF safetensors directory on a shared filesystem that the engine loads (rollout.weight_sync=disk).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

import torch

from rfpo_megatron.config import Config, ConfigError
from rfpo_megatron.train.runtime import Runtime, barrier, stopping_error


def sync_weights(rt: Runtime, resume_memory: bool = False, weight_version: int | None = None) -> None:
    """Push the actor's weights to the rollout engine as HF-named tensors, in buckets
    (rollout.weight_sync_bucket_mb). Collective over TP (gathers shards); with PP each stage's TP rank 0 /
    DP rank 0 pushes its own layers (`tensor`), or relays them to global rank 0, the update group's only
    sender (`distributed`). `disk`: every rank writes its part of one HF directory (`write_weights_dir`),
    then rank 0 alone asks the engine to load it. Tensor and distributed updates run inside one SGLang
    weight-update session (opened and closed by rank 0; SGLang >= 0.5.21 refuses updates outside one).
    `resume_memory`: the engine released its memory (rollout.colocate): re-allocate the weights first,
    everything else it released (KV cache, and CUDA graphs from SGLang 0.5.5) after the update.
    `weight_version` (trainer.async_mode): sent with every update, the engine stamps it on what it generates
    afterwards (meta_info.weight_version)."""
    mode = sync_mode(rt.cfg)
    version = None if weight_version is None else str(int(weight_version))
    with contextlib.ExitStack() as session:
        if rt.is_rank0 and rt.engine is not None:
            if resume_memory:
                engine_call(rt, rt.engine.resume_memory, ["weights"])
            if mode != "disk":
                cm = rt.engine.weight_update_session()
                if engine_call(rt, cm.__enter__) is not _LOST:  # closed (end_weight_update) at the block's end
                    session.push(lambda *exc: engine_call(rt, cm.__exit__, *exc) is True)
        barrier(rt)
        bucket_bytes = int(rt.cfg.rollout.weight_sync_bucket_mb) * (1 << 20)
        if mode == "disk":
            path = write_weights_dir(rt, bucket_bytes)
            if rt.is_rank0 and rt.engine is not None:
                engine_call(rt, rt.engine.update_weights_from_disk, path, weight_version=version)
                _remove_old_dirs(os.path.dirname(path), keep=os.path.basename(path))
        elif mode == "distributed":
            _push_distributed(rt, bucket_bytes, version)
        else:
            _push_tensors(rt, bucket_bytes, version)
        barrier(rt)
    if rt.is_rank0 and rt.engine is not None:
        if resume_memory:
            engine_call(rt, rt.engine.resume_memory, [t for t in rt.engine.memory_tags if t != "weights"])
        engine_call(rt, rt.engine.flush_cache)


_LOST = object()  # what engine_call returns once the engine went away


def engine_call(rt: Runtime, fn, *args, **kwargs) -> Any:
    """One engine call of the sync (rank 0, or a later stage's sender). When it fails because the job is
    stopping (train/runtime.stopping_error: SIGTERM came with it, the servers got the same signal) the engine
    is marked lost and not called again, while the ranks' collectives go on to the step's end, where the
    checkpoint takes the weights; any other failure is raised."""
    if rt.engine_lost:
        return _LOST
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised unless the job is stopping
        if not stopping_error(rt, exc):
            raise
        rt.engine_lost = True
        return _LOST


def _push_tensors(rt: Runtime, bucket_bytes: int, version: str | None = None) -> None:
    """rollout.weight_sync=tensor: every stage's sender posts its buckets to every server itself."""
    from rfpo_megatron.convert.export import iter_hf_weights

    sender = rt.engine is not None and _is_sync_sender()
    for bucket in iter_hf_weights(rt.actor.modules, rt.actor.hf_config, bucket_bytes):
        if sender:
            engine_call(rt, rt.engine.update_weights_from_tensors, list(bucket), flush_cache=False,
                         **({} if version is None else {"weight_version": version}))


def _push_distributed(rt: Runtime, bucket_bytes: int, version: str | None = None) -> None:
    """rollout.weight_sync=distributed: global rank 0 broadcasts every bucket over the update group. With PP,
    the sender of each later stage (TP 0 / DP 0, in rank 0's pipeline group) sends its buckets to rank 0 point
    to point (names/shapes/dtypes as an object, then the tensors), stage after stage, ending with None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from rfpo_megatron.convert.export import iter_hf_weights

    if rt.is_rank0 and rt.weight_group is None:
        rt.weight_group = connect_weight_group(rt)
    pp = mpu.get_pipeline_model_parallel_world_size()
    sender = _is_sync_sender()
    for bucket in iter_hf_weights(rt.actor.modules, rt.actor.hf_config, bucket_bytes):
        if rt.is_rank0:
            engine_call(rt, rt.engine.push_weights_distributed, rt.weight_group, list(bucket), flush_cache=False,
                         weight_version=version)
        elif sender:
            dist.send_object_list([[(n, list(t.shape), t.dtype) for n, t in bucket]], dst=0)
            for _, t in bucket:
                dist.send(t.detach().contiguous(), dst=0)
    if pp == 1:
        return
    if sender and not rt.is_rank0:
        dist.send_object_list([None], dst=0)
    if rt.is_rank0:
        device = next(rt.actor.modules[0].parameters()).device
        for src in dist.get_process_group_ranks(mpu.get_pipeline_model_parallel_group())[1:]:
            while True:
                box: list[Any] = [None]
                dist.recv_object_list(box, src=src)
                if box[0] is None:
                    break
                bucket = []
                for name, shape, dtype in box[0]:
                    t = torch.empty(shape, dtype=dtype, device=device)
                    dist.recv(t, src=src)
                    bucket.append((name, t))
                engine_call(rt, rt.engine.push_weights_distributed, rt.weight_group, bucket, flush_cache=False,
                             weight_version=version)


def releases_memory(cfg: Config) -> bool:
    """Whether the trainer releases the engine's memory before each update and resumes it at the weight sync:
    only when colocated, and (rollout.release_memory=auto) unless the engine is the embedded CPU server the
    trainer launches itself — it shares host RAM with the actor, so a release frees nothing a GPU needs and
    re-allocating its weights every step costs ~20 ms of a 0.25 s tiny step (docs/benchmarks.md, issue 18).
    SGLang servers and external servers (rollout.server_urls) are released."""
    r = cfg.rollout
    if not r.colocate or r.release_memory == "never":
        return False
    return r.release_memory == "always" or r.engine != "embedded" or bool(r.server_urls)


def sync_mode(cfg: Config, nodes: int | None = None) -> str:
    """rollout.weight_sync resolved: `tensor` (HTTP, colocated or CPU), `distributed` (a NCCL/gloo group
    trainer -> servers, for servers on other nodes) or `disk` (an HF directory on a filesystem the servers
    share, `weight_sync_dir`). `auto`: distributed when not colocated; colocated, tensor on one node and disk
    across nodes (`tensor` pushes CUDA-IPC handles, which only a server on the sender's node can open; NCCL
    cannot join a trainer rank and a server sharing one GPU). nodes: the job's node count (`job_nodes()`)."""
    mode = cfg.rollout.weight_sync
    nodes = job_nodes() if nodes is None else nodes
    if mode == "auto":
        if not cfg.rollout.colocate:
            return "distributed"
        return "tensor" if nodes == 1 else "disk"
    if mode == "tensor" and nodes > 1 and cfg.rollout.engine == "sglang":
        raise ConfigError(f"rollout.weight_sync=tensor on {nodes} nodes: SGLang's tensor updates carry CUDA-IPC "
                          f"handles that only a server on the sender's node can open; use weight_sync=disk (shared "
                          f"filesystem) or, with the servers on their own GPUs, weight_sync=distributed")
    return mode


def job_nodes() -> int:
    """Nodes of the training job: SLURM_NNODES / SLURM_JOB_NUM_NODES, else WORLD_SIZE / LOCAL_WORLD_SIZE, else 1."""
    for key in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if os.environ.get(key, "").isdigit():
            return max(1, int(os.environ[key]))
    world, local = os.environ.get("WORLD_SIZE", ""), os.environ.get("LOCAL_WORLD_SIZE", "")
    if world.isdigit() and local.isdigit() and int(local) > 0:
        return max(1, int(world) // int(local))
    return 1


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

    box = [rt.engine.spec() if rt.is_rank0 else None]  # URLs, TP size (entries per tensor payload), router
    dist.broadcast_object_list(box, src=0)
    if not rt.is_rank0 and _is_sync_sender():
        rt.engine = EngineClient.from_spec(box[0])


def _is_sync_sender() -> bool:
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_data_parallel_rank() == 0
