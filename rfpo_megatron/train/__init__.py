"""The stages of one RFPO step, used by rfpo_megatron.trainer (the loop) and rfpo_megatron.evaluate.

    runtime      Runtime, Preempted, abortable/stop_requested (SIGTERM), timed, step_seed, touch, barrier
    generation   rank 0: sampling_params, rollout (+ ReMax greedy baselines), baseline_metrics, score_samples,
                 fix_stage, dynamic_sampling, run_eval
    batch        every rank: StepBatch, build_batch, logprob_pass, compute_roff, advantages (-> Advantages),
                 make_step (-> Step: the step's data padded once), update_policy(rt, step)
    critic       algo.adv_estimator=gae: build_critic, value_pass, update_critic(rt, step)
    evaluation   evaluate_sets, pass_at_k, score_set (avg@k / pass@k; the eval CLI is rfpo_megatron.evaluate)
    weight_sync  sync_weights, sync_mode, connect_weight_group, share_engine, write_weights_dir
    checkpoint   capture_state, save_trainer_checkpoint, load_trainer_checkpoint, latest_trainer_checkpoint,
                 STATE_FILE (step directories / `latest`: rfpo_megatron.actor.checkpoint's helpers)
    lifecycle    setup, teardown, validate_setup (every set-up check, before anything is built), check_paths,
                 build_actor, launch_rollout_engine, engine_config

The names below are re-exported so that `from rfpo_megatron import train as T; T.build_batch(...)` works.
"""
from rfpo_megatron.train.batch import (  # noqa: F401
    Advantages,
    Step,
    StepBatch,
    advantages,
    build_batch,
    compute_roff,
    fixed_logprob_pass,
    logprob_pass,
    old_logp_from_forward,
    make_step,
    rollout_correction,
    sequences_for_logprob,
    step_advantages,
    tis_weights,
    update_policy,
)
from rfpo_megatron.train.critic import build_critic, update_critic, value_pass  # noqa: F401
from rfpo_megatron.train.checkpoint import (  # noqa: F401
    STATE_FILE,
    capture_state,
    latest_trainer_checkpoint,
    load_trainer_checkpoint,
    save_trainer_checkpoint,
)
from rfpo_megatron.train.generation import baseline_metrics, dynamic_sampling, fix_stage, rollout, run_eval, sampling_params, score_samples  # noqa: F401
from rfpo_megatron.train.runtime import (  # noqa: F401
    SEED_EVAL,
    SEED_FIX,
    SEED_REFILL,
    SEED_ROLLOUT,
    Preempted,
    Runtime,
    abortable,
    barrier,
    broadcast_groups,
    install_signal_handlers,
    stop_requested,
    step_seed,
    timed,
    touch,
)
from rfpo_megatron.train.lifecycle import (  # noqa: F401
    build_actor,
    check_paths,
    engine_config,
    launch_rollout_engine,
    setup,
    teardown,
    validate_setup,
)
from rfpo_megatron.train.weight_sync import (  # noqa: F401
    connect_weight_group,
    job_nodes,
    share_engine,
    sync_mode,
    sync_weights,
    weight_sync_dir,
    write_weights_dir,
)

__all__ = [
    "Advantages",
    "Step",
    "StepBatch",
    "advantages",
    "build_batch",
    "compute_roff",
    "fixed_logprob_pass",
    "logprob_pass",
    "old_logp_from_forward",
    "make_step",
    "rollout_correction",
    "sequences_for_logprob",
    "step_advantages",
    "tis_weights",
    "update_policy",
    "build_critic",
    "update_critic",
    "value_pass",
    "STATE_FILE",
    "capture_state",
    "latest_trainer_checkpoint",
    "load_trainer_checkpoint",
    "save_trainer_checkpoint",
    "SEED_EVAL",
    "SEED_FIX",
    "SEED_REFILL",
    "SEED_ROLLOUT",
    "Preempted",
    "Runtime",
    "abortable",
    "barrier",
    "broadcast_groups",
    "install_signal_handlers",
    "stop_requested",
    "step_seed",
    "timed",
    "touch",
    "baseline_metrics",
    "dynamic_sampling",
    "fix_stage",
    "rollout",
    "run_eval",
    "sampling_params",
    "score_samples",
    "build_actor",
    "check_paths",
    "validate_setup",
    "engine_config",
    "launch_rollout_engine",
    "setup",
    "teardown",
    "connect_weight_group",
    "job_nodes",
    "share_engine",
    "sync_mode",
    "sync_weights",
    "weight_sync_dir",
    "write_weights_dir",
]
