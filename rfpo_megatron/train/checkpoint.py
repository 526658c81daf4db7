"""Trainer checkpoints: `save_dir/step_NNNNNN/` (actor state [+ critic/ with gae] + trainer_state.pt + config.yaml) and `latest`.

Vocabulary: `save_trainer_checkpoint` / `load_trainer_checkpoint` write and read a trainer checkpoint; the actor
states inside it are `rfpo_megatron.actor.checkpoint.save_actor_state` / `load_actor_state`; the step
directories, `latest` and pruning are that module's helpers (`step_dir_name`, `latest_step_dir`, ...).

A save goes to `step_N.tmp`, is renamed, then `latest` is replaced: a kill at any moment leaves the previous
complete checkpoint as `latest`. `trainer_state.pt` holds what the actor's own checkpoint does not: the data
sampler position, python/numpy/torch RNG states, the internalization tracker, budget counters, W&B run id.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Optional

import numpy as np
import torch

from rfpo_megatron.actor.checkpoint import latest_step_dir, prune_step_dirs, step_dir_name, write_latest
from rfpo_megatron.config import ConfigError, save_config, to_dict
from rfpo_megatron.train.runtime import Runtime, barrier

STATE_FILE = "trainer_state.pt"


def capture_state(rt: Runtime) -> dict:
    """Everything besides the actor needed to continue exactly: data position, RNG states, tracker,
    cumulative counters and the W&B run id."""
    return {
        "sampler": rt.sampler.state_dict() if rt.sampler is not None else None,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "tracker": rt.tracker.state_dict() if rt.tracker is not None else None,
        "counters": dict(rt.counters),
        "wandb_run_id": rt.logger.wandb_run_id if rt.logger is not None else None,
    }


def latest_trainer_checkpoint(save_dir: str) -> Optional[str]:
    """The complete trainer checkpoint `save_dir/latest` names, or None (FileNotFoundError when it names an
    incomplete one)."""
    return latest_step_dir(save_dir, STATE_FILE, strict=True)


def save_trainer_checkpoint(rt: Runtime, step: int, state: dict) -> str:
    """Write `save_dir/step_NNNNNN/` (actor state + trainer_state.pt), then point `latest` at it.
    A kill at any moment leaves the previous complete checkpoint as `latest`."""
    cfg = rt.cfg
    final = os.path.join(cfg.trainer.save_dir, step_dir_name(step))
    tmp = final + ".tmp"
    if rt.is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    barrier(rt)
    from rfpo_megatron.actor.checkpoint import save_actor_state as save_actor

    fmt = cfg.trainer.checkpoint_format
    save_actor(rt.actor, os.path.join(tmp, "actor"), step=step, fmt=fmt)
    if rt.critic is not None:  # algo.adv_estimator=gae: the value model, same format
        save_actor(rt.critic, os.path.join(tmp, "critic"), step=step, fmt=fmt)
    barrier(rt)
    if rt.is_rank0:
        torch.save({"step": step, "config": to_dict(cfg), **state}, os.path.join(tmp, STATE_FILE))
        save_config(cfg, os.path.join(tmp, "config.yaml"))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_latest(cfg.trainer.save_dir, os.path.basename(final))
        prune_step_dirs(cfg.trainer.save_dir, cfg.trainer.keep_last)
        rt.last_checkpoint = final
    barrier(rt)
    return final


def load_trainer_checkpoint(rt: Runtime, ckpt: str) -> int:
    """Restore the actor (and the critic, with gae) and the trainer state from `ckpt`; returns its step."""
    from rfpo_megatron.actor.checkpoint import load_actor_state as load_actor

    state = torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=False)
    load_actor(rt.actor, os.path.join(ckpt, "actor"))
    if rt.critic is not None:
        if not os.path.isdir(os.path.join(ckpt, "critic")):
            raise ConfigError(f"--resume with algo.adv_estimator=gae: {ckpt} has no critic/ checkpoint (saved "
                              f"without gae?); resume with the estimator it was saved with or start a new save_dir")
        load_actor(rt.critic, os.path.join(ckpt, "critic"), load_rng=False)
    if state.get("sampler") and rt.sampler is not None:
        rt.sampler.load_state_dict(state["sampler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rt.tracker is not None:
        rt.tracker.load_state_dict(state.get("tracker"))
    rt.counters.update(state.get("counters") or {})
    rt.resumed_wandb_id = state.get("wandb_run_id")
    return int(state["step"])
