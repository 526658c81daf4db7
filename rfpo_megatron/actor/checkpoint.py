"""Actor state (model + optimizer + LR scheduler + RNG + step), atomic, resharding across TP/PP on load.

Vocabulary: an *actor state* is what `save_actor_state` writes for one model (the actor, or the critic); a
*trainer checkpoint* (`rfpo_megatron.train.checkpoint`) holds actor states plus the trainer's own state. Both
lay out their steps the same way, with the helpers defined here: ``step_NNNNNN`` directories
(`step_dir_name`), a ``latest`` file naming the newest complete one (`write_latest`, `latest_step_dir`) and
`prune_step_dirs`.

Layout under an actor-state directory ``ckpt_dir``::

    ckpt_dir/latest              text file: name of the newest complete state ("step_000010")
    ckpt_dir/step_000010/        one state
        meta.json                step, tp/pp/dp, format, vocab, scheduler state, caller's ``extra``
        model_pp{r}.pt           "full" format: canonical TP=1 tensors (global layer names) of PP stage r
                                 (all of its virtual-pipeline chunks)
        optim_pp{r}.pt           "full" format: per-parameter Adam state, same names/sharding rules
        rng_rank{g}.pt           python/numpy/torch/CUDA RNG + megatron tracker states of global rank g
        dist/                    "dist" format: megatron dist_checkpointing (model + optimizer)

A save writes into ``step_N.tmp``, renames it to ``step_N`` and then replaces
``latest`` atomically (``os.replace``); a process killed at any point leaves
``latest`` naming a complete checkpoint. Stale ``*.tmp`` directories are removed
by the next save.

Formats: ``"full"`` (works everywhere; tensors gathered with
``rfpo_megatron.convert.sharding.gather_full_state`` and re-sharded on load with
``load_full_state``, so any TP/PP/VPP layout can load it) and ``"dist"`` (megatron
``dist_checkpointing``, GPU default, resharding handled by megatron: its sharded keys carry
global layer offsets, so the virtual-pipeline size may change too). RNG states are restored
only when the (tp, pp, vpp, dp) layout is unchanged.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from rfpo_megatron.convert.sharding import (canonical_params, expert_name, gather_full_state, is_expert, load_full_state,
                                            merge_tp, shard_tp, tp_kind)

FORMAT_VERSION = 1
LATEST = "latest"
STEP_DIR = "step_{:06d}"  # the one step-directory format (older actor states used step_{:08d}: read via `latest`)


# ------------------------------------------------------------------ helpers
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    """Directory name of the state / checkpoint of step ``step`` (``step_NNNNNN``)."""
    return STEP_DIR.format(int(step))


def latest_step_dir(root: str, marker: str = "meta.json", strict: bool = False) -> Optional[str]:
    """The step directory that ``root/latest`` names when it holds ``marker`` (a complete save), else None.
    Any name works (old ``step_%08d`` / ``step_%06d`` directories too). strict: a ``latest`` that names an
    incomplete directory is a FileNotFoundError instead of None."""
    f = os.path.join(root, LATEST)
    if not os.path.isfile(f):
        return None
    with open(f) as fh:
        name = fh.read().strip()
    path = os.path.join(root, name)
    if os.path.isfile(os.path.join(path, marker)):
        return path
    if strict:
        raise FileNotFoundError(f"{f} names '{name}' but {path}/{marker} is missing; point {f} at a complete "
                                f"step_* directory or start without --resume")
    return None


def write_latest(root: str, name: str) -> None:
    """Point ``root/latest`` at ``name`` atomically (written, fsynced, then renamed over the old one)."""
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(root, LATEST))


def prune_step_dirs(root: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete ``step_*`` directories (by step number; <= 0 keeps all)."""
    if keep_last <= 0:
        return

    def step_of(name: str) -> int:
        digits = name[len("step_"):]
        return int(digits) if digits.isdigit() else -1

    steps = sorted((n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".tmp")),
                   key=lambda n: (step_of(n), n))
    for n in steps[:-keep_last]:
        shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def _resolve(path: str) -> str:
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    found = latest_step_dir(path)
    if found is None:
        raise FileNotFoundError(
            f"no actor checkpoint at {path!r} (expected meta.json or a '{LATEST}' file); check actor.load"
        )
    return found


def _inner_optimizers(opt) -> list:
    return list(getattr(opt, "chained_optimizers", [opt]))


def _state_param_map(opt) -> dict[int, torch.Tensor]:
    """id(model param) -> the tensor the torch optimizer keeps state for (fp32 main param or itself)."""
    out: dict[int, torch.Tensor] = {}
    for mo in _inner_optimizers(opt):
        if hasattr(mo, "float16_groups"):
            for g16, g32 in zip(mo.float16_groups, mo.fp32_from_float16_groups):
                for p, m in zip(g16, g32):
                    out[id(p)] = m
            for g in mo.fp32_from_fp32_groups:
                for p in g:
                    out[id(p)] = p
        else:
            for g in mo.optimizer.param_groups:
                for p in g["params"]:
                    out[id(p)] = p
    return out


def _torch_state(opt) -> dict:
    """Merged read-only view: state tensor owner -> its Adam state."""
    st: dict = {}
    for mo in _inner_optimizers(opt):
        st.update(mo.optimizer.state)
    return st


def _torch_optimizer_of(opt) -> dict[int, torch.optim.Optimizer]:
    """id(state tensor owner) -> the torch optimizer holding it."""
    out: dict[int, torch.optim.Optimizer] = {}
    for mo in _inner_optimizers(opt):
        for g in mo.optimizer.param_groups:
            for p in g["params"]:
                out[id(p)] = mo.optimizer
    return out


def _tp_group(name: str) -> tuple[int, int, Any]:
    """(size, rank, group) a parameter is TP-split over: TP, or expert TP for MoE experts."""
    from megatron.core import parallel_state as mpu

    if is_expert(name):
        return (mpu.get_expert_tensor_parallel_world_size(), mpu.get_expert_tensor_parallel_rank(),
                mpu.get_expert_tensor_parallel_group())
    return (mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank(),
            mpu.get_tensor_model_parallel_group())


def _tp_gather(name: str, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
    tp, _, group = _tp_group(name)
    if tp == 1 or tp_kind(name) == "rep":
        shards = [local]
    else:
        local = local.contiguous()
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local, group=group)
    return merge_tp(name, shards, vocab_size=vocab_size if tp_kind(name) == "vocab" else None)


def _ep_gather(name: str, entry: dict, n_experts: int) -> dict[str, dict]:
    """{canonical name: entry} of this expert's state on every EP rank (the entry itself without EP / for non-experts)."""
    from megatron.core import parallel_state as mpu

    ep = mpu.get_expert_model_parallel_world_size() if n_experts else 1
    if ep == 1 or not is_expert(name):
        return {name: entry}
    boxes: list = [None] * ep
    dist.all_gather_object(boxes, {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in entry.items()},
                           group=mpu.get_expert_model_parallel_group())
    n_local = n_experts // ep
    k = int(name.split("local_experts.")[1].split(".")[0]) % n_local
    return {expert_name(name, r * n_local + k): box for r, box in enumerate(boxes)}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    st = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    get_cuda_rng_tracker().set_states(st["tracker"])
    if torch.cuda.is_available() and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"])


# -------------------------------------------------------------------- save
def save_actor_state(
    actor,
    ckpt_dir: str,
    *,
    step: Optional[int] = None,
    extra: Optional[dict] = None,
    fmt: str = "auto",
    keep_last: Optional[int] = None,
) -> str:
    """Save ``actor`` (collective over all ranks); returns the checkpoint path.

    extra: JSON-serialisable caller state (trainer counters, data sampler position).
    fmt: "auto" (dist on GPU, full on CPU), "full" or "dist".
    keep_last: delete older ``step_*`` directories beyond the newest ``keep_last``.
    """
    from megatron.core import parallel_state as mpu

    fmt = _pick_format(fmt)
    if fmt == "full" and getattr(actor, "use_dist_opt", False):
        raise ValueError(
            "checkpoint format 'full' cannot gather the distributed optimizer's sharded state; "
            "use fmt='dist' (the GPU default) or actor.use_distributed_optimizer=false"
        )
    step = int(actor.step if step is None else step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = os.path.join(ckpt_dir, step_dir_name(step))
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        for name in os.listdir(ckpt_dir):
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()

    tp_rank = mpu.get_tensor_model_parallel_rank()
    pp_rank = mpu.get_pipeline_model_parallel_rank()
    dp_rank = mpu.get_data_parallel_rank()
    writer = tp_rank == 0 and dp_rank == 0
    dist_optim = False
    if fmt == "full":
        model_state = gather_full_state(actor.modules, vocab_size=actor.vocab_size)
        optim_state = _gather_optimizer_state(actor) if actor.optimizer is not None else {}
        if writer:
            torch.save(model_state, os.path.join(tmp, f"model_pp{pp_rank}.pt"))
            torch.save(optim_state, os.path.join(tmp, f"optim_pp{pp_rank}.pt"))
    else:
        dist_optim = _save_dist(actor, os.path.join(tmp, "dist"))
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "format": fmt,
            "step": step,
            "tp": mpu.get_tensor_model_parallel_world_size(),
            "pp": mpu.get_pipeline_model_parallel_world_size(),
            "vpp": mpu.get_virtual_pipeline_model_parallel_world_size(),
            "dp": mpu.get_data_parallel_world_size(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "vocab_size": actor.vocab_size,
            "dist_optimizer_saved": dist_optim,
            "scheduler": actor.scheduler.state_dict() if actor.scheduler is not None else None,
            "extra": extra or {},
        }
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1, default=float)
    _barrier()
    if rank == 0:
        _fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_latest(ckpt_dir, os.path.basename(final))
        if keep_last:
            prune_step_dirs(ckpt_dir, keep_last)
    _barrier()
    return final


def _pick_format(fmt: str) -> str:
    if fmt == "auto":
        return "dist" if torch.cuda.is_available() else "full"
    if fmt not in ("full", "dist"):
        raise ValueError(f"checkpoint format {fmt!r} must be 'auto', 'full' or 'dist'")
    return fmt


def _fsync_dir(path: str) -> None:
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def _gather_optimizer_state(actor) -> dict[str, Any]:
    """Canonical name -> {"exp_avg", "exp_avg_sq", "step", ["main_param"]} as full TP=1 tensors."""
    pmap = _state_param_map(actor.optimizer)
    tstate = _torch_state(actor.optimizer)
    n_experts = getattr(actor.modules[0].config, "num_moe_experts", None) or 0
    out: dict[str, Any] = {}
    for name, p in canonical_params(actor.modules):
        sp = pmap.get(id(p))
        st = tstate.get(sp, {}) if sp is not None else {}
        entry: dict[str, Any] = {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                entry[key] = _tp_gather(name, st[key].detach(), actor.vocab_size)
        if "step" in st:
            entry["step"] = float(st["step"])
        if sp is not None and sp is not p:
            entry["main_param"] = _tp_gather(name, sp.detach(), actor.vocab_size)
        out.update(_ep_gather(name, entry, n_experts))  # MoE: every EP rank's experts
    return out


def _optimizer_has_state(actor) -> bool:
    """True once the optimizer has taken a step (Adam moments exist)."""
    return actor.optimizer is not None and any(len(s) > 0 for s in _torch_state(actor.optimizer).values())


def _save_dist(actor, path: str) -> bool:
    """dist_checkpointing save of model (+ optimizer once it has state); returns whether the optimizer was saved."""
    from megatron.core import dist_checkpointing

    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)  # dist_checkpointing.save wants an existing directory
    _barrier()
    with_optim = _optimizer_has_state(actor)
    dist_checkpointing.save(_dist_sharded_state(actor, is_loading=False, with_optimizer=with_optim), path)
    return with_optim


def _model_keys(actor) -> list[str]:
    """Top-level keys of the chunks' sharded state dicts: "model" (one chunk), "model0", "model1", ... (virtual PP,
    megatron's own convention). Only the ShardedTensor keys inside (global layer offsets) reach the files, so a
    checkpoint loads at another virtual-pipeline size."""
    n = len(actor.modules)
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _dist_sharded_state(actor, *, is_loading: bool, with_optimizer: bool) -> dict:
    sd: dict[str, Any] = {k: m.sharded_state_dict() for k, m in zip(_model_keys(actor), actor.modules)}
    if with_optimizer and actor.optimizer is not None:
        sd["optimizer"] = actor.optimizer.sharded_state_dict(
            dict(sd), is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
        )
    return sd


# -------------------------------------------------------------------- load
def load_actor_state(actor, path: str, *, load_optimizer: bool = True, load_rng: bool = True) -> dict:
    """Load a checkpoint (directory or ``ckpt_dir`` with ``latest``) into ``actor``; collective.

    Any TP/PP layout can load a "full" checkpoint. Sets ``actor.step`` and the
    scheduler; returns the checkpoint's meta dict (with the caller's ``extra``).
    """
    from megatron.core import parallel_state as mpu

    path = _resolve(path)
    with open(os.path.join(path, "meta.json")) as fh:
        meta = json.load(fh)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}/meta.json: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    if meta["format"] == "full":
        full: dict[str, torch.Tensor] = {}
        optim: dict[str, Any] = {}
        for r in range(int(meta["pp"])):
            full.update(torch.load(os.path.join(path, f"model_pp{r}.pt"), map_location="cpu", weights_only=True))
            if load_optimizer and actor.optimizer is not None:
                optim.update(torch.load(os.path.join(path, f"optim_pp{r}.pt"), map_location="cpu", weights_only=True))
        load_full_state(actor.modules, full, vocab_size=int(meta["vocab_size"]))
        if actor.optimizer is not None:
            if optim:
                _load_optimizer_state(actor, optim, int(meta["vocab_size"]))
            else:
                actor.optimizer.reload_model_params()
    else:
        _load_dist(actor, os.path.join(path, "dist"), load_optimizer=load_optimizer and meta.get("dist_optimizer_saved", False))
    if actor.scheduler is not None and meta.get("scheduler") and load_optimizer:
        actor.scheduler.load_state_dict(meta["scheduler"])
    actor.step = int(meta["step"])
    actor._param_sync_pending = False  # main params were restored together with the weights
    same_layout = (
        int(meta["tp"]) == mpu.get_tensor_model_parallel_world_size()
        and int(meta["pp"]) == mpu.get_pipeline_model_parallel_world_size()
        and meta.get("vpp") == mpu.get_virtual_pipeline_model_parallel_world_size()
        and int(meta["dp"]) == mpu.get_data_parallel_world_size()
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if load_rng and same_layout and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    _barrier()
    return meta


def _load_optimizer_state(actor, optim: dict[str, Any], vocab_size: int) -> None:
    pmap = _state_param_map(actor.optimizer)
    owners = _torch_optimizer_of(actor.optimizer)
    missing = []

    def shard(name, full, like):
        tp, rank, _ = _tp_group(name)  # experts: the expert-TP split
        if tp_kind(name) == "vocab":
            full = full[:vocab_size]
            return shard_tp(name, full, tp, rank, padded_vocab=like.shape[0] * tp)
        return shard_tp(name, full, tp, rank)

    with torch.no_grad():
        for name, p in canonical_params(actor.modules):
            sp = pmap.get(id(p))
            entry = optim.get(name)
            if entry is None and name == "output_layer.weight":
                # tied embeddings saved with PP = 1 hold one parameter; the last stage's head copy gets the
                # same all-reduced gradient, hence the same Adam state (as load_full_state does for weights)
                entry = optim.get("embedding.word_embeddings.weight")
            if sp is None:
                continue
            if entry is None:
                missing.append(name)
                continue
            if "main_param" in entry and sp is not p:
                sp.copy_(shard(name, entry["main_param"], sp).to(sp.dtype))
            elif sp is not p:
                sp.copy_(p.detach().float())
            if "exp_avg" in entry:
                owners[id(sp)].state[sp] = {
                    "step": torch.tensor(float(entry.get("step", 0.0)), dtype=torch.float32),
                    "exp_avg": shard(name, entry["exp_avg"], sp).to(sp.dtype),
                    "exp_avg_sq": shard(name, entry["exp_avg_sq"], sp).to(sp.dtype),
                }
    if missing:
        raise ValueError(f"optimizer state missing for {len(missing)} parameters (e.g. {missing[0]!r})")


def _zero_optimizer_state(opt) -> None:
    """Give a never-stepped optimizer zero Adam state (step 0) to load into.

    megatron's distributed optimizer reads ``step`` from its torch state when it builds the
    loading state dict, and a fresh torch Adam has none; the loaded values replace these.
    """
    for mo in _inner_optimizers(opt):
        inner = mo.optimizer
        if type(inner).__name__ == "HybridDeviceOptimizer":
            continue  # keeps its own state bookkeeping (step read from param_groups)
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p.data), "exp_avg_sq": torch.zeros_like(p.data)}


def _load_dist(actor, path: str, *, load_optimizer: bool) -> None:
    from megatron.core import dist_checkpointing

    if load_optimizer and actor.optimizer is not None and not _optimizer_has_state(actor):
        _zero_optimizer_state(actor.optimizer)
    sd = _dist_sharded_state(actor, is_loading=True, with_optimizer=load_optimizer)
    loaded = dist_checkpointing.load(sd, path)
    for key, module in zip(_model_keys(actor), actor.modules):
        module.load_state_dict(loaded[key], strict=False)
    if "optimizer" in loaded and actor.optimizer is not None:
        actor.optimizer.load_state_dict(loaded["optimizer"])
    elif actor.optimizer is not None:
        actor.optimizer.reload_model_params()
