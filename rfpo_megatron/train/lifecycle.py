"""Building and tearing down the Runtime: input checks, actor (+ reference, + critic for gae), rollout engine, resume, logger.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from rfpo_megatron.config import Config, ConfigError, to_dict
from rfpo_megatron.train.checkpoint import latest_trainer_checkpoint, load_trainer_checkpoint
from rfpo_megatron.train.runtime import Runtime, install_signal_handlers, touch
from rfpo_megatron.train.weight_sync import share_engine, sync_mode, sync_weights


def sglang_server_args(cfg: Config) -> dict:
    """rollout.server_args plus what the rollout section says about the servers: mem_fraction_static (SGLang
    sizes its pool from it), the memory saver when colocated (release/resume need it) and deterministic
    inference (SGLang ignores sampling_seed without it). A server_args entry that contradicts the section
    is a ConfigError."""
    r = cfg.rollout
    args = dict(r.server_args)
    want = {"mem_fraction_static": r.mem_fraction_static}
    if r.colocate:
        want["enable_memory_saver"] = True
    if r.deterministic_inference:
        want["enable_deterministic_inference"] = True
    if returns_routed_experts(cfg):
        want["enable_return_routed_experts"] = True
    for key, value in want.items():
        if key in args and args[key] != value:
            raise ConfigError(f"rollout.server_args.{key}={args[key]!r} contradicts the rollout section (which asks "
                              f"for {value!r}); set it in one place")
        args[key] = value
    return args


def returns_routed_experts(cfg: Config) -> bool:
    """Whether the rollout keeps each sample's MoE routing: rollout.return_routed_experts or actor.router_replay=rollout."""
    return bool(cfg.rollout.return_routed_experts or cfg.actor.router_replay == "rollout")


def engine_config(cfg: Config) -> dict:
    """The rollout section mapped onto rfpo_megatron.rollout.launch.EngineConfig field names."""
    r = cfg.rollout
    return {"backend": "external" if r.server_urls else r.engine, "urls": list(r.server_urls),
            "router_url": r.router_url or None,
            "model_path": cfg.actor.hf_model_path, "log_dir": os.path.join(cfg.logging.log_dir, "rollout_logs"),
            "startup_timeout_s": r.startup_timeout_s, "request_timeout_s": r.request_timeout_s,
            "watchdog_s": r.watchdog_s, "tp_size": r.sglang_tp, "num_gpus": r.num_servers * r.sglang_tp,
            "server_args": sglang_server_args(cfg) if r.engine == "sglang" else dict(r.server_args),
            "router_args": dict(r.router_args), "threads": int(os.environ.get("OMP_NUM_THREADS", "1") or 1),
            "return_routed_experts": returns_routed_experts(cfg)}


def validate_setup(cfg: Config, check_files: bool = True) -> None:
    """Every set-up check, before anything is built; each ConfigError names the config field (the style of
    config.validate, which already checked choices and ranges when the config was loaded): the input paths
    (`check_files`), the reward name, the weight-sync mode for this job's nodes, rollout.generate_fn (loaded and its
    signature checked with `check_files`) and its kwargs, and what the actor supports."""
    if check_files:
        check_paths(cfg)
    from rfpo_megatron.rewards.registry import check_reward_spec

    check_reward_spec(cfg.data)  # a registered name, or a user function that loads and fits data.reward_kwargs
    sync_mode(cfg)  # a bad weight_sync choice fails now, not after the first step
    from rfpo_megatron.train.custom_rollout import validate_generate_fn

    validate_generate_fn(cfg.rollout.generate_fn, cfg.rollout.generate_kwargs, load=check_files)


def check_paths(cfg: Config) -> None:
    """Fail early, naming the config field, when an input path is missing (part of validate_setup)."""
    if not cfg.actor.hf_model_path or not os.path.isfile(os.path.join(cfg.actor.hf_model_path, "config.json")):
        raise ConfigError(f"config field 'actor.hf_model_path': '{cfg.actor.hf_model_path}' is not an HF model "
                          f"directory (no config.json); for the demo run examples/tiny_cpu/prepare.py first")
    if not cfg.data.train_files:
        raise ConfigError("config field 'data.train_files' is empty; list the jsonl/parquet prompt files to train on")
    from rfpo_megatron.data.dataset import DataError, resolve_data_files

    for name in ("train_files", "eval_files"):
        try:
            resolve_data_files(list(getattr(cfg.data, name)))  # files, globs, `datasets` directories
        except DataError as exc:
            raise ConfigError(f"config field 'data.{name}': {exc}") from None


def build_actor(cfg: Config, with_optimizer: bool = True) -> Any:
    """The megatron-core actor initialised from the HF weights of actor.hf_model_path."""
    from transformers import AutoConfig

    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.convert.hf_load import load_hf_into_model

    hf_config = AutoConfig.from_pretrained(cfg.actor.hf_model_path)
    actor = Actor(hf_config, cfg.actor, total_steps=max(1, cfg.trainer.steps),
                  temperature=cfg.rollout.temperature, with_optimizer=with_optimizer)
    load_hf_into_model(actor.modules, cfg.actor.hf_model_path)
    return actor


def lone_process_port() -> None:
    """A lone process (WORLD_SIZE / SLURM_NTASKS 1) without MASTER_PORT gets a free port, so two runs or evals on
    one machine never collide on torch's default 29500."""
    single = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1) == 1
    if single and "MASTER_PORT" not in os.environ:
        from rfpo_megatron.rollout.procs import free_port

        os.environ["MASTER_PORT"] = str(free_port())


def setup(cfg: Config) -> Runtime:
    """Parallel init, tokenizer, data, verifier, actor (+ reference, + critic), engine, resume, logger, signals."""
    from transformers import AutoTokenizer

    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.data.dataset import load_kwargs, load_prompt_sets
    from rfpo_megatron.data.sampler import PromptSampler
    from rfpo_megatron.data.template import PromptFormat
    from rfpo_megatron.logging import MetricsLogger
    from rfpo_megatron.logging.metrics import InternalizationTracker
    from rfpo_megatron.rewards import build_reward

    validate_setup(cfg)  # every check that needs no model and no process group, before anything is built
    data_kw = load_kwargs(cfg.data)
    prompts = load_prompt_sets(list(cfg.data.train_files), **data_kw).records  # bad data fails before init
    eval_sets = {os.path.splitext(os.path.basename(p))[0]: load_prompt_sets([p], **data_kw).records
                 for p in cfg.data.eval_files}
    lone_process_port()
    info = init_parallel(cfg.actor.tensor_model_parallel_size, cfg.actor.pipeline_model_parallel_size,
                         seed=cfg.trainer.seed, vpp=cfg.actor.virtual_pipeline_model_parallel_size,
                         ep=cfg.actor.expert_model_parallel_size, etp=cfg.actor.expert_tensor_parallel_size)
    rt = Runtime(cfg, rank=info.rank, world_size=info.world_size, prompts=prompts,
                 eval_sets=eval_sets if info.rank == 0 else {})
    if rt.is_rank0:  # only rank 0 scores (a process-pool verifier would otherwise start on every rank)
        rt.verifier = build_reward(cfg.data)  # data.reward_fn / reward_url under data.reward_error_policy
        if hasattr(rt.verifier, "close"):
            rt.cleanup.append(rt.verifier.close)
    install_signal_handlers(rt)
    rt.tokenizer = AutoTokenizer.from_pretrained(cfg.actor.hf_model_path)
    rt.pad_id = rt.tokenizer.pad_token_id if rt.tokenizer.pad_token_id is not None else 0
    rt.eos_ids = [rt.tokenizer.eos_token_id] if rt.tokenizer.eos_token_id is not None else []
    rt.prompt_format = PromptFormat(mode="auto" if cfg.data.chat_template else "plain")
    rt.sampler = PromptSampler(len(rt.prompts), cfg.data.prompts_per_step, seed=cfg.trainer.seed,
                               shuffle=cfg.data.shuffle)
    rt.tracker = InternalizationTracker()
    rt.actor = build_actor(cfg)
    a = cfg.algo
    if a.use_kl_loss or a.use_kl_in_reward or cfg.actor.use_reference:
        rt.ref_actor = build_actor(cfg, with_optimizer=False)
    if a.adv_estimator == "gae":  # PPO with a critic
        from rfpo_megatron.train.critic import build_critic

        rt.critic = build_critic(cfg)
    if rt.is_rank0:
        rt.engine = launch_rollout_engine(cfg)
        rt.cleanup.append(rt.engine.shutdown)
    share_engine(rt)
    resumed = False
    if cfg.trainer.resume:
        ckpt = latest_trainer_checkpoint(cfg.trainer.save_dir)
        if ckpt is None:
            rt.log(f"--resume: no checkpoint in {cfg.trainer.save_dir}; starting from step 0")
        else:
            rt.step = load_trainer_checkpoint(rt, ckpt)
            rt.last_checkpoint = ckpt
            resumed = True
            rt.log(f"resumed from {ckpt} (step {rt.step})")
    elif cfg.actor.load:  # start from a Megatron checkpoint's weights (fresh optimizer and data position)
        from rfpo_megatron.actor.checkpoint import load_actor_state as load_actor

        load_actor(rt.actor, cfg.actor.load, load_optimizer=False, load_rng=False)
        resumed = True
    if resumed:  # the engine serves the HF start weights; give it the restored ones (async: stamped rt.step)
        sync_weights(rt, weight_version=rt.step if cfg.trainer.async_mode != "off" else None)
    if rt.is_rank0:
        rt.logger = MetricsLogger(cfg.logging, cfg.trainer.steps, config=to_dict(cfg), start_step=rt.step,
                                  wandb_run_id=rt.resumed_wandb_id if resumed else None)
        rt.cleanup.insert(0, rt.logger.finish)
    touch(cfg.trainer.heartbeat_file)
    return rt


def launch_rollout_engine(cfg: Config) -> Any:
    from rfpo_megatron.rollout.launch import launch_engine

    return launch_engine(engine_config(cfg))


def teardown(rt: Runtime) -> None:
    """Finish the logger, stop the engine, tear down the process groups (errors here are printed, not raised)."""
    for fn in rt.cleanup:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - shutting down; report and go on
            print(f"[rfpo-megatron] cleanup: {type(exc).__name__}: {exc}", file=sys.stderr)
    rt.cleanup.clear()
    try:
        from rfpo_megatron.actor.parallel import destroy_parallel

        destroy_parallel()
    except Exception:  # noqa: BLE001
        pass
