"""The RFPO training loop: rollout -> reward -> fix stage -> log-probs -> R_off -> advantages -> update -> sync.

    rfpo-megatron train examples/tiny_cpu/config.yaml [section.key=value ...] [--resume]

One SPMD job (a single CPU process by default; `torchrun`/`srun` for TP/PP > 1). Rank 0 drives the
rollout engine, the verifier and the fix stage, then broadcasts the step's groups; every rank runs the
actor's log-prob pass and train step; the weight sync pushes HF-named tensors actor -> engine.
`rfpo.enabled=false` is the plain base algorithm (GRPO, DAPO, ...): no fix stage and R_off = 1.

Checkpoints (`trainer.save_dir/step_NNNNNN/`: the actor's own checkpoint + `trainer_state.pt` with the
data position, RNG states, tracker and W&B run id; `latest` names the newest complete one) are written
every `trainer.save_interval` steps, at the end, and on SIGTERM. `--resume` continues from `latest` so
that the next step's metrics equal those of an uninterrupted run. A heartbeat file is touched every step
and SIGUSR1 dumps every thread's stack (the Slurm watchdog's contract, docs/trainer.md).

`trainer.async_mode` one_step | bounded: a producer thread on rank 0 runs `collect_groups` for the next steps
while this loop trains (rfpo_megatron.train.async_rollout); the weight sync pauses generation, and the
samples of later steps carry the weight versions that made them (metrics rollout/staleness_*).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch

from rfpo_megatron.config import Config, ConfigError, load_config
from rfpo_megatron.data.types import RolloutGroup
from rfpo_megatron.logging.metrics import grad_signal_frac, group_flags, roff_metrics, rollout_metrics
from rfpo_megatron.train.async_rollout import consume, start_producer, sync_while_paused
from rfpo_megatron.train.batch import (build_batch, compute_roff, fixed_logprob_pass, logprob_pass, make_step,
                                      old_logp_from_forward, step_advantages, update_policy)
from rfpo_megatron.train.checkpoint import STATE_FILE, capture_state, latest_trainer_checkpoint, save_trainer_checkpoint  # noqa: F401
from rfpo_megatron.train.critic import update_critic, value_pass
from rfpo_megatron.train.generation import baseline_metrics, dynamic_sampling, fix_stage, rollout, run_eval
from rfpo_megatron.train.runtime import (SEED_EVAL, SEED_FIX, Preempted, Runtime, abortable,  # noqa: F401
                                         broadcast_groups, budget_reached, step_seed, stop_requested, stopping_error,
                                         timed, touch)
from rfpo_megatron.train.lifecycle import setup, teardown
from rfpo_megatron.train.weight_sync import releases_memory, sync_weights

# STATE_FILE, latest_trainer_checkpoint, SEED_EVAL and step_seed are re-exported (tests, scripts import them from here).


def train(cfg: Config) -> dict[str, float]:
    """Run `cfg.trainer.steps` steps (continuing from the latest checkpoint when `trainer.resume`).

    Returns the last step's metrics (rank 0; {} on other ranks).
    """
    rt = setup(cfg)
    metrics: dict[str, float] = {}
    try:
        if cfg.trainer.async_mode != "off" and rt.is_rank0:
            rt.producer = start_producer(rt, collect_groups)  # generates the next steps while we train
        for step in range(rt.step + 1, cfg.trainer.steps + 1):
            rt.snapshot = capture_state(rt)  # what a checkpoint of step-1 holds (used if preempted mid-step)
            metrics = train_one_step(rt, step)
            rt.step = step
            touch(cfg.trainer.heartbeat_file)
            last = step == cfg.trainer.steps or budget_reached(rt)
            if cfg.trainer.eval_interval and (step % cfg.trainer.eval_interval == 0 or last):
                try:
                    with abortable(rt):  # rank 0 only, no collectives: SIGTERM just skips it
                        metrics.update(run_eval(rt, step))
                except Exception as exc:  # noqa: BLE001 - re-raised unless the job is stopping
                    if not stopping_error(rt, exc):
                        raise
                    rt.log(f"SIGTERM during the eval of step {step}: eval skipped")
            if rt.is_rank0:
                rt.logger.log(step, metrics)
            stop = stop_requested(rt)
            if stop or last or (cfg.trainer.save_interval and step % cfg.trainer.save_interval == 0):
                save_trainer_checkpoint(rt, step, capture_state(rt))
            if stop:
                rt.log(f"SIGTERM: saved checkpoint at step {step}; exiting")
                break
            if last and step < cfg.trainer.steps:
                rt.log(f"rollout budget trainer.max_generations={cfg.trainer.max_generations} reached at step {step}")
                break
        if rt.is_rank0:
            rt.log(summary(rt))
    except Preempted:
        save_trainer_checkpoint(rt, rt.step, rt.snapshot)
        rt.log(f"SIGTERM during step {rt.step + 1}: saved the checkpoint of step {rt.step}; exiting")
    finally:
        teardown(rt)
    return metrics


def train_one_step(rt: Runtime, step: int) -> dict[str, float]:
    """One RL step; returns its metrics (rollout/*, rfpo/*, train/*, perf/*)."""
    cfg, m, t_step = rt.cfg, {}, time.perf_counter()
    groups = next_groups(rt, step, m) if rt.is_rank0 else None  # rollout + reward + fix (rank 0)
    if rt.is_rank0 and groups is not None and releases_memory(cfg):
        try:
            rt.engine.release_memory()  # colocated: the engine's weights + KV cache leave the GPUs while we train
        except Exception as exc:  # noqa: BLE001 - re-raised unless the job is stopping
            groups = _preempted(rt, exc)
    groups = broadcast_groups(rt, groups)
    if groups is None:  # rank 0 was preempted before anything changed: save step-1 and stop
        raise Preempted()

    with abortable(rt, collective=True), timed(m, "perf/logprob_time"):
        batch = build_batch(groups, rt.pad_id)
        if old_logp_from_forward(cfg, rt.actor, batch.n):  # one optimizer step: old = the train forward's own
            roff_logp, orig_logp = fixed_logprob_pass(rt.actor, batch)  # only R_off's rows: fixed + originals
            old_logp = None
        else:
            old_logp, orig_logp = logprob_pass(rt.actor, batch)  # [N, T], [F, T0] (originals of the fixed rows)
            roff_logp = old_logp
        ref_logp = logprob_pass(rt.ref_actor, batch, originals=False)[0] if rt.ref_actor is not None else None
        values = value_pass(rt, batch)  # [N, T] critic values on the plain prompt (gae), else None
    log_roff = compute_roff(cfg, batch, roff_logp, orig_logp)  # [N], detached, 0 for unfixed
    adv = step_advantages(rt, batch, old_logp, ref_logp, values, m)  # advantages, loss mask (+ gae returns)
    step_data = make_step(cfg, batch, old_logp, ref_logp, values, log_roff, adv)  # everything [N, T], padded once
    with timed(m, "perf/train_time"):
        m.update(update_critic(rt, step_data))  # gae: clipped value loss towards the returns; {} otherwise
        m.update(update_policy(rt, step_data))
    if not stop_requested(rt):  # on SIGTERM the engine is going away: the checkpoint holds the weights
        with timed(m, "perf/weight_sync_time"):
            if cfg.trainer.async_mode == "off":
                sync_weights(rt, resume_memory=releases_memory(cfg))
            else:  # between engine batches: running generations are resumed with the new weights
                sync_while_paused(rt, step)

    m["perf/old_logprob_pass_skipped"] = float(old_logp is None)
    n_tok = sum(len(r) for r in batch.response_ids) + sum(len(p) for p in batch.prompt_ids)
    if rt.is_rank0:
        m.update(roff_metrics(log_roff, batch.is_fixed, cfg.rfpo.roff_clip))
        m.update(step_data.correction_metrics)  # train/rollout_logprob_gap_*, train/rollout_correction/*
        m["rfpo/grad_signal_frac"] = grad_signal_frac(step_data.advantages.abs().sum(-1), batch.group_index,
                                                     batch.num_groups)
        m.update(rt.tracker.metrics())
        m["rollout/generations_total"] = float(rt.counters.get("generations", 0))
        m["rollout/generated_tokens_total"] = float(rt.counters.get("generated_tokens", 0))
    m["perf/step_time"] = time.perf_counter() - t_step
    m["perf/tokens_per_s"] = n_tok / max(m["perf/step_time"], 1e-9)
    m["perf/train_tokens"] = float(n_tok)
    return m


def next_groups(rt: Runtime, step: int, m: dict) -> Optional[list[RolloutGroup]]:
    """Rank 0: step `step`'s groups -- made now (async_mode off), or taken from the rollout producer, which made
    them while earlier steps trained (perf/rollout_wait_time: how long this step waited for them)."""
    if rt.producer is None:
        return collect_groups(rt, step, m)
    cfg = rt.cfg  # deadline: each generate call of a step (rollout + fix per generation round) has its own timeout
    deadline_s = cfg.rollout.request_timeout_s * 2 * (1 + cfg.algo.max_gen_batches)
    try:
        with abortable(rt), timed(m, "perf/rollout_wait_time"):
            item = rt.producer.get(step, timeout_s=deadline_s)
    except Exception as exc:  # noqa: BLE001 - re-raised unless the job is stopping
        return _preempted(rt, exc)
    return consume(rt, item, step, m)


def collect_groups(rt: Runtime, step: int, m: dict) -> Optional[list[RolloutGroup]]:
    """Rank 0: rollout -> reward -> fix stage (-> dynamic sampling). None when SIGTERM interrupted it
    (multi-rank: the others learn it from the broadcast; single process: Preempted propagates)."""
    cfg = rt.cfg
    try:
        with abortable(rt), timed(m, "perf/rollout_time"):
            records = [rt.prompts[i] for i in rt.sampler.next_indices()]
            groups = rollout(rt, records, seed=step_seed(cfg, step))
        m.update(rollout_metrics(groups, cfg.rfpo.fix.success_threshold))
        m.update(baseline_metrics(groups))  # remax: the greedy responses' mean reward
        rt.tracker.update(step, groups, cfg.rfpo.fix.threshold, cfg.rfpo.fix.success_threshold)
        if cfg.rfpo.enabled:
            with abortable(rt), timed(m, "perf/fix_time"):
                before = group_flags(groups, cfg.rfpo.fix.threshold, cfg.rfpo.fix.success_threshold)
                groups, fix_m = fix_stage(rt, groups, seed=step_seed(cfg, step, SEED_FIX))
                m.update(fix_m)
                m.update(before)  # zero/full group fractions of the policy's own samples
        else:
            m.update(group_flags(groups, cfg.rfpo.fix.threshold, cfg.rfpo.fix.success_threshold))
        if cfg.algo.dynamic_sampling:
            with abortable(rt), timed(m, "perf/rollout_time", accumulate=True):
                groups = dynamic_sampling(rt, groups, step, m)
        if hasattr(rt.verifier, "pop_errors"):  # data.reward_error_policy=zero: items scored 0 after an error
            m["rollout/reward_errors"] = float(rt.verifier.pop_errors())
        return groups
    except Exception as exc:  # noqa: BLE001 - re-raised unless the job is stopping
        return _preempted(rt, exc)


def _preempted(rt: Runtime, exc: Exception) -> None:
    """Rank 0's rollout stage raised `exc`: re-raise it unless the job is stopping (SIGTERM, or an engine error
    that came with it, train/runtime.stopping_error); then None, which the broadcast turns into "preempted"
    on every rank (a single process raises Preempted)."""
    if not stopping_error(rt, exc):
        raise exc
    if rt.world_size == 1:
        raise exc if isinstance(exc, Preempted) else Preempted() from exc
    return None


def summary(rt: Runtime) -> str:
    """Where the run's outputs are (printed at the end)."""
    lines = ["run finished:",
             f"  metrics JSONL : {os.path.abspath(rt.logger.jsonl_path)}",
             f"  W&B run       : {os.path.abspath(rt.logger.wandb_dir) if rt.logger.wandb_dir else '(disabled)'}"
             + (f"  (upload: wandb sync {os.path.abspath(rt.logger.wandb_dir)})"
                if rt.logger.wandb is not None and rt.logger.wandb.mode == "offline" else ""),
             f"  checkpoint    : {os.path.abspath(rt.last_checkpoint) if rt.last_checkpoint else '(none)'}"]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rfpo-megatron train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML config (e.g. examples/tiny_cpu/config.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. rfpo.enabled=false)")
    p.add_argument("--resume", action="store_true", help="continue from trainer.save_dir/latest")
    return p.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads())
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume:
            cfg.trainer.resume = True
        train(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"rfpo-megatron train: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # data errors name file:line and field (rfpo_megatron.data.dataset.DataError)
        from rfpo_megatron.data.dataset import DataError

        if not isinstance(exc, DataError):
            raise
        print(f"rfpo-megatron train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
