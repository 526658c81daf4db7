"""Typed configuration: dataclass sections loaded from YAML with `key=value` overrides, validated with clear errors.

Usage::

    cfg = load_config("examples/tiny_cpu/config.yaml", ["algo.adv_estimator=grpo", "rfpo.enabled=false"])

Names follow verl/slime where one exists (`adv_estimator`, `loss_agg_mode`, `clip_ratio_low/high/c`,
`kl_loss_type`, `tensor_model_parallel_size`, `mem_fraction_static`). Every error a user can cause names
the field, the bad value and what is allowed (with a "did you mean" hint for misspelt keys and choices).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A user-facing configuration error (one line: field, bad value, fix)."""


ADV_ESTIMATOR_NAMES = (
    "grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "reinforce_pp_baseline",
    "remax", "gae", "reinforce_rej", "raft",
)
POLICY_LOSS_NAMES = ("ppo", "gspo", "cispo", "gppo", "aspo", "ecpo", "bapo", "reinforce_loss", "raft_pp")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3", "k1+", "k3+")
LOSS_FORMS = ("faithful", "corrected", "weighted")
OFFPOLICY_SHAPINGS = ("none", "luffy", "guide")  # rfpo.offpolicy_shaping (algos/objective.py: offpolicy_shaped_loss)
FIX_VARIANTS = ("rewrite", "reward", "error_info", "reference")


ROLLOUT_CORRECTION_MODES = ("tis", "icepop", "seq_mask_tis", "seq_is", "token_reject", "seq_reject")
REJECT_KL_TYPES = ("k1", "k2", "k3")


@dataclass
class RolloutCorrectionConfig:
    """Rollout-to-train correction on rho_t = exp(old_logp - rollout_logp), a chain of modes (algorithms.md)."""

    modes: list = field(default_factory=list)  # applied in order (tis | icepop | seq_mask_tis | seq_is | token_reject | seq_reject); [] with algo.tis_cap set = [tis]
    icepop_low: float = 0.5  # icepop: tokens with rho_t outside [low, high] are masked
    icepop_high: float = 2.0
    seq_mask_low: float = 0.9  # seq_mask_tis: sequences whose geometric-mean ratio is outside [low, high] are masked
    seq_mask_high: float = 1.1
    seq_is_cap: float = 2.0  # seq_is: sequence weight min(prod_t rho_t, cap)
    reject_kl_type: str = "k3"  # token_reject / seq_reject divergence: k1 | k2 | k3 of rollout vs train
    token_reject_threshold: float = 1.0  # token_reject: tokens with |k_t| > threshold are masked
    seq_reject_threshold: float = 0.05  # seq_reject: sequences with |mean_t k_t| > threshold are masked


@dataclass
class AlgoConfig:
    """Advantage estimator, policy loss and add-ons (see docs/algorithms.md)."""

    adv_estimator: str = "grpo"
    policy_loss: str = "ppo"
    norm_adv_by_std: bool = True
    loss_agg_mode: Optional[str] = None  # null: token-mean (gspo: seq-mean-token-mean)
    loss_agg_max_len: Optional[int] = None  # constant L_max of seq-mean-token-sum-norm (null: algo.max_response_len)
    clip_ratio_low: Optional[float] = None  # null: 0.2 (gspo: 3e-4)
    clip_ratio_high: Optional[float] = None  # null: 0.2 (gspo: 4e-4); clip-higher (DAPO): e.g. 0.28
    clip_ratio_c: Optional[float] = None  # dual-clip constant c > 1 (e.g. 3.0); None = off
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "k3"  # k1 | k2 | k3 (clamped ±10) | k1+ | k3+ (straight-through: value k1/k3, gradient k2)
    use_kl_in_reward: bool = False  # token reward −β·k(old, ref) for every estimator (needs the reference model)
    kl_in_reward_coef: float = 0.001  # β (initial value when kl_target is set)
    kl_in_reward_type: str = "k1"
    kl_target: Optional[float] = None  # adaptive KL controller target (PPO/verl); null = fixed β
    kl_horizon: int = 10000  # adaptive controller horizon (sequences)
    gamma: float = 1.0  # GAE / REINFORCE++ discount
    lam: float = 1.0  # GAE lambda
    ecpo_delta: float = 0.1
    bapo_rho0: float = 0.4
    bapo_a_low: float = 0.6  # c_low starts at a⁻ and is RAISED toward b⁻ (paper: 0.6 -> 0.9)
    bapo_a_high: float = 1.2
    bapo_b_low: float = 0.9
    bapo_b_high: float = 3.0
    bapo_delta_high: float = 0.05
    bapo_delta_low: float = 0.02
    pos_nll_coef: float = 0.0  # VAPO positive-example NLL on correct responses (reward >= rfpo.fix.success_threshold)
    chord_mu: float = 0.0  # CHORD-phi: (1-mu)·policy + mu·SFT on fixed (expert) tokens
    tis_cap: Optional[float] = None  # truncated importance sampling cap C (rollout correction tis / seq_mask_tis); None = off
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    overlong_buffer_len: int = 0  # DAPO L_cache; 0 = off
    overlong_penalty_factor: float = 1.0
    max_response_len: int = 64
    dynamic_sampling: bool = False  # DAPO: drop all-equal groups and refill
    max_gen_batches: int = 3


@dataclass
class FixConfig:
    """The RFPO fix stage (rollout side)."""

    variant: list = field(default_factory=lambda: ["reference"])  # rewrite | reward | error_info | reference; a list cycles
    trigger: str = "all_wrong"  # all_wrong | any_wrong
    threshold: float = 0.0  # a group is "all wrong" when every reward <= threshold
    max_per_group: int = 2
    attempts: int = 1
    success_threshold: float = 1.0
    placement: str = "replace"  # replace | append
    max_new_tokens: Optional[int] = None  # defaults to rollout.max_new_tokens
    temperature: Optional[float] = None  # defaults to rollout.temperature
    templates: dict = field(default_factory=dict)  # variant -> template string overriding the default


@dataclass
class RFPOConfig:
    """R_off and the RFPO loss form (algorithms.md, RFPO)."""

    enabled: bool = True
    gamma: float = 1.0
    roff_mode: str = "seq_mean"  # seq_sum (the blog's form) | seq_mean (length-normalised)
    roff_clip: float = 2.0  # log C: |log R_off| <= roff_clip, R_off in [1/C, C]; at most 29.7 (fp32 loss)
    loss_form: str = "weighted"  # weighted (R_off a bounded sequence weight) | faithful (the blog) | corrected
    wrong_advantage: str = "group"  # group (as the estimator gives) | zero: wrong samples of a group with a fix get 0
    offpolicy_shaping: str = "none"  # none | luffy: fix tokens' loss −A·p/(p+c) | guide: −A·r/(r+c), r per token vs the fix prompt
    shaping_c: float = 0.1  # c of offpolicy_shaping (LUFFY's 0.1)
    fix: FixConfig = field(default_factory=FixConfig)


@dataclass
class ActorConfig:
    """The Megatron-core actor: model, parallel layout, batching and optimizer."""

    hf_model_path: str = ""  # HF-format directory (config.json + weights + tokenizer)
    load: Optional[str] = None  # Megatron checkpoint to start from (else the HF weights)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None  # model chunks per PP rank (interleaved 1F1B); null = off
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 4
    max_tokens_per_gpu: Optional[int] = None  # dynamic micro-batching by token budget
    packing: str = "auto"  # auto (thd with TransformerEngine, pad otherwise) | thd (packed, cu_seqlens) | pad
    global_batch_size: Optional[int] = None  # samples per optimizer step; None = the whole rollout batch
    ppo_epochs: int = 1
    recompute: str = "none"  # none | selective | full
    recompute_method: str = "uniform"  # full recompute: uniform | block (megatron's recompute_method)
    recompute_num_layers: int = 1  # full recompute: layers per checkpointed chunk (uniform) / recomputed layers (block)
    bf16: bool = False
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: Optional[bool] = None  # None: on with a GPU or with CPU offload, off on CPU
    optimizer_cpu_offload: bool = False  # megatron's hybrid CPU-Adam optimizer (needs bf16 + distributed optimizer)
    overlap_grad_reduce: bool = True  # bucketed DP gradient reduction overlapped with backward
    grad_reduce_bucket_size: Optional[int] = None  # elements per reduction bucket (None: megatron's default)
    use_fused_kernels: bool = True  # Triton log-prob/loss kernels on CUDA
    use_reference: bool = False  # keep a reference model for KL (auto-on when a KL term is used)
    router_replay: str = "off"  # MoE routing replay (R3): off | rollout (the log-prob pass and train step use the rollout engine's top-k experts per token; implies rollout.return_routed_experts; with recompute only at PP = 1; docs/actor.md)
    # MoE models (Qwen3-MoE) only; ignored by dense models
    expert_model_parallel_size: int = 1  # EP: the experts of each MoE layer spread over this many ranks
    expert_tensor_parallel_size: Optional[int] = None  # expert TP (each expert's linears split); null = tensor_model_parallel_size
    moe_token_dispatcher_type: str = "alltoall"  # alltoall | allgather (allgather needs pipeline_model_parallel_size=1)
    moe_aux_loss_coef: Optional[float] = None  # load-balancing loss coefficient (megatron's aux_loss); null = the HF config's router_aux_loss_coef
    moe_z_loss_coef: Optional[float] = None  # router z-loss coefficient; null = off


@dataclass
class CriticConfig:
    """The value model for algo.adv_estimator=gae (PPO with a critic): the actor's architecture and parallel layout,
    trunk initialised from actor.hf_model_path, a zero-initialised value head; built only with gae."""

    lr: float = 1e-5  # the critic's own Adam learning rate
    min_lr: float = 0.0
    warmup_steps: int = 0  # linear LR warm-up (critic optimizer steps)
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    cliprange_value: float = 0.5  # value clip ε: V is kept within V_old ± ε in the clipped value loss
    ppo_epochs: int = 1  # passes of critic updates over each step's batch (mini-batches: actor.global_batch_size)


@dataclass
class RolloutConfig:
    """The rollout engine (embedded CPU engine or SGLang servers) and sampling."""

    engine: str = "embedded"  # embedded | sglang
    n_samples: int = 8  # responses per prompt (G)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    num_servers: int = 1
    sglang_tp: int = 1
    mem_fraction_static: float = 0.7
    colocate: bool = True  # release SGLang memory during training
    release_memory: str = "auto"  # colocated: free the engine's weights + KV cache while training; auto = yes unless the embedded CPU engine (nothing to free: it shares host RAM), always | never
    server_args: dict = field(default_factory=dict)  # extra `sglang.launch_server` args
    router_args: dict = field(default_factory=dict)  # extra `sglang_router.launch_router` args (docs/rollout.md)
    deterministic_inference: bool = False  # SGLang --enable-deterministic-inference: sampling seeds honoured (slower)
    return_routed_experts: bool = False  # MoE: servers run with --enable-return-routed-experts and every sample keeps its routing (train/router_replay_mismatch is logged; actor.router_replay=rollout replays it)
    server_urls: list = field(default_factory=list)  # use already-running servers instead of launching
    router_url: Optional[str] = None  # with server_urls: their router (generation goes there, weight sync to each)
    request_timeout_s: float = 600.0
    startup_timeout_s: float = 600.0
    watchdog_s: float = 300.0
    weight_sync: str = "auto"  # auto | tensor | distributed | disk
    weight_sync_bucket_mb: int = 512
    weight_sync_dir: Optional[str] = None  # weight_sync=disk: HF copies, shared FS (null: <trainer.save_dir>/weight_sync)
    generate_fn: Optional[str] = None  # null: sampled responses | multi_turn | "pkg.module:fn" | "path/file.py:fn" (docs/data_and_rewards.md)
    generate_kwargs: dict = field(default_factory=dict)  # keyword arguments of generate_fn (multi_turn: max_turns, env_fn, feedback_template, max_env_tokens)


@dataclass
class DataConfig:
    """Prompt sets and the reward function."""

    train_files: list = field(default_factory=list)  # jsonl / parquet files, globs, or HF `datasets` save_to_disk dirs
    eval_files: list = field(default_factory=list)  # same forms; one eval set per entry
    prompt_key: str = "prompt"  # record field holding the prompt (string or chat messages)
    answer_key: str = "answer"  # record field holding the reference answer
    solution_key: str = "solution"  # record field holding the step-by-step solution (optional in records)
    id_key: str = "id"  # record field holding the record id (default <file stem>:<line>)
    reward_fn: str = "math"  # math | exact_match | arithmetic | addition_strict | code | "pkg.module:fn" | "path/file.py:fn"
    reward_kwargs: dict = field(default_factory=dict)  # keyword arguments for the reward factory / function
    reward_error_policy: str = "raise"  # raise | zero: a reward that raises or is non-finite fails the step or scores 0
    reward_url: Optional[str] = None  # remote reward service (POST batches; docs/data_and_rewards.md); replaces reward_fn
    reward_url_batch_size: int = 32  # items per POST
    reward_url_concurrency: int = 4  # POSTs in flight at once
    reward_url_timeout_s: float = 30.0  # per-attempt timeout of one POST
    reward_url_attempts: int = 3  # tries per POST (connection errors, timeouts, HTTP 5xx), backoff in between
    reward_url_backoff_s: float = 0.5  # wait before retry k: backoff_s * 2**(k-1)
    prompts_per_step: int = 8
    max_prompt_len: int = 512
    chat_template: bool = True
    skip_bad_records: bool = False
    shuffle: bool = True


@dataclass
class LoggingConfig:
    """W&B, the JSONL metrics file and the console."""

    project: str = "rfpo_megatron"
    run_name: Optional[str] = None
    wandb_mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    log_dir: str = "outputs/run"
    console: bool = True


@dataclass
class TrainerConfig:
    """The loop: steps, evaluation, checkpointing, seeds."""

    steps: int = 10
    # stop after the step at which the rollout budget (rollout/generations_total: sampled responses, fix generations
    # and dynamic-sampling refills included) reaches this; the stop step is evaluated and saved like the last one.
    # null = run `steps` steps (the cap either way). For equal-budget comparisons (examples/tiny_cpu/compare.py)
    max_generations: Optional[int] = None
    seed: int = 1
    eval_interval: int = 0  # 0 = no periodic eval
    eval_n_samples: int = 4  # k for avg@k / pass@k
    save_interval: int = 0  # 0 = only at the end
    save_dir: str = "outputs/run/checkpoints"
    resume: bool = False
    keep_last: int = 2
    checkpoint_format: str = "auto"  # actor/critic states: auto (dist on GPU, full on CPU) | dist | full
    heartbeat_file: Optional[str] = None  # touched every step (for the Slurm watchdog)
    # auto: with one optimizer step over the whole rollout batch (actor.ppo_epochs=1, global_batch_size null or >=
    # the batch) and nothing reading old log-probs before the update (no KL in reward, no TIS), the training forward's
    # own detached log-probs are old_logp and the separate pass only scores RFPO's fixed rows + originals (R_off);
    # false: always run the full old-log-prob pass
    skip_old_logprob_pass: str = "auto"  # auto: old_logp from the train forward when exact (one optimizer step) | false
    # overlap of rollout and training (docs/trainer.md "Asynchronous training"): off = every step generates with the
    # weights of the step before (today's loop); one_step = a producer thread on rank 0 generates step k+1 (fix stage
    # included) while the actor trains step k (data at most 1 step stale); bounded = up to max_staleness steps ahead.
    # Needs rollout.colocate=false (the engine keeps its own devices). Generations running at a weight sync are
    # aborted and resumed with the new weights (partial rollout); every token records its weight version.
    async_mode: str = "off"  # off | one_step | bounded
    max_staleness: int = 1  # bounded: how many weight versions older than the trainer's a sample may start from


@dataclass
class Config:
    """The whole run."""

    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rfpo: RFPOConfig = field(default_factory=RFPOConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ----------------------------------------------------------------------------------------------- loading

def _closest(name: str, options) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_name_message(field: str, value: Any, choices) -> str:
    """The package's one message for a name that is not one of `choices` (config values, registry lookups, reward
    names): `config field 'F': 'v' is not one of [a, b] (did you mean 'a'?)`. Raise it as a ConfigError (a
    ValueError) or a ValueError."""
    options = [str(o) for o in choices]
    return f"config field '{field}': '{value}' is not one of {options}{_closest(value, options)}"


def _coerce(path: str, value: Any, ftype: Any) -> Any:
    """Convert a YAML/override value to the field's declared type, or raise a ConfigError."""
    t = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", str(ftype))
    optional = t.startswith("Optional[")
    base = t[len("Optional["):-1] if optional else t
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config field '{path}' may not be null (expected {base})")
    if optional and isinstance(value, str) and value.lower() in ("null", "none", "~"):
        return None
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if base == "dict":
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if base == "list":
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{path}': expected {t}, got {value!r}") from None
    return value


def _build(cls, data: dict, prefix: str):
    """Instantiate dataclass `cls` from a nested dict, naming unknown keys with a hint."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{_closest(key, fields)}")
        f = fields[key]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value or {}, path)
        else:
            kwargs[key] = _coerce(path, value, f.type)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars/lists) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. algo.adv_estimator=grpo)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("+")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


# |log R_off| bound for the fp32 loss (algos.policy_loss.max_log_roff(torch.float32), torch-free here): R_off²·ρ·|A|
# with ρ <= e^20 and |A| <= 1e4 stays finite: (log(3.4028e38) - 20 - log(1e4)) / 2
ROFF_CLIP_MAX = 29.75
# the policy losses' own defaults for knobs left null (GSPO: Zheng et al. 2025)
LOSS_DEFAULTS = {"gspo": {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4, "loss_agg_mode": "seq-mean-token-mean"}}
GENERIC_LOSS_DEFAULTS = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "loss_agg_mode": "token-mean"}


def resolve_loss_defaults(a: Any) -> Any:
    """Fill algo.clip_ratio_low/high and loss_agg_mode left null with the policy loss's own defaults (gspo:
    3e-4 / 4e-4, seq-mean-token-mean; others 0.2 / 0.2, token-mean); values the user set are kept. The clip
    ratios stay null for losses that have none (reinforce_loss; bapo adapts its own bounds). In place."""
    loss = getattr(a, "policy_loss", "ppo")
    own = LOSS_DEFAULTS.get(loss, {})
    for k, v in GENERIC_LOSS_DEFAULTS.items():
        if k.startswith("clip_ratio") and loss in _NO_CLIP_RATIO:
            continue
        if getattr(a, k, None) is None:
            setattr(a, k, own.get(k, v))
    return a


_NO_CLIP_RATIO = ("reinforce_loss", "bapo")


def _inactive_algo_knobs(a: Any) -> None:
    """Refuse an algo.* knob set to a non-default value where it cannot act (one line naming it and why)."""
    d = AlgoConfig()
    pl, est = a.policy_loss, a.adv_estimator
    rules = [
        ("norm_adv_by_std", est == "grpo", "acts only with algo.adv_estimator=grpo"),
        ("gamma", est in ("gae", "reinforce_pp", "reinforce_pp_baseline"), "acts only with adv_estimator gae / reinforce_pp(_baseline)"),
        ("lam", est == "gae", "acts only with algo.adv_estimator=gae"),
        ("clip_ratio_c", pl not in ("cispo", "reinforce_loss"), f"policy_loss={pl} has no dual clip"),
        ("clip_ratio_low", pl not in _NO_CLIP_RATIO, f"policy_loss={pl} has no ratio clip (bapo adapts its own bounds)"),
        ("clip_ratio_high", pl not in _NO_CLIP_RATIO, f"policy_loss={pl} has no ratio clip (bapo adapts its own bounds)"),
        ("ecpo_delta", pl == "ecpo", "acts only with algo.policy_loss=ecpo"),
        ("loss_agg_max_len", (a.loss_agg_mode or LOSS_DEFAULTS.get(pl, {}).get("loss_agg_mode")) == "seq-mean-token-sum-norm",
         "acts only with algo.loss_agg_mode=seq-mean-token-sum-norm"),
        ("kl_loss_coef", a.use_kl_loss, "acts only with algo.use_kl_loss=true"),
        ("kl_loss_type", a.use_kl_loss, "acts only with algo.use_kl_loss=true"),
        ("kl_in_reward_coef", a.use_kl_in_reward, "acts only with algo.use_kl_in_reward=true"),
        ("kl_in_reward_type", a.use_kl_in_reward, "acts only with algo.use_kl_in_reward=true"),
        ("kl_target", a.use_kl_in_reward, "acts only with algo.use_kl_in_reward=true"),
        ("kl_horizon", a.use_kl_in_reward and a.kl_target is not None, "acts only with use_kl_in_reward=true and kl_target set"),
    ] + [(k, pl == "bapo", "acts only with algo.policy_loss=bapo") for k in
         ("bapo_rho0", "bapo_a_low", "bapo_a_high", "bapo_b_low", "bapo_b_high", "bapo_delta_high", "bapo_delta_low")]
    for name, active, why in rules:
        if not active and getattr(a, name) != getattr(d, name):
            raise ConfigError(f"config field 'algo.{name}': {getattr(a, name)!r} would have no effect: it {why}; "
                              "remove it or change that setting")


def correction_modes(a: Any) -> list:
    """The rollout-correction chain in effect: algo.rollout_correction.modes, or [tis] when only algo.tis_cap is set."""
    modes = list(a.rollout_correction.modes)
    return modes or (["tis"] if a.tis_cap is not None else [])


def _validate_rollout_correction(a: Any) -> None:
    """Names, ranges, and knobs that cannot act (one line each) of algo.rollout_correction."""
    rc, d, p = a.rollout_correction, RolloutCorrectionConfig(), "algo.rollout_correction"
    for name in rc.modes:
        if name not in ROLLOUT_CORRECTION_MODES:
            raise ConfigError(unknown_name_message(f"{p}.modes", name, ROLLOUT_CORRECTION_MODES))
    if len(set(rc.modes)) != len(rc.modes):
        raise ConfigError(f"config field '{p}.modes': {rc.modes} names a mode twice")
    modes = correction_modes(a)
    if "tis" in modes and "seq_mask_tis" in modes:
        raise ConfigError(f"config field '{p}.modes': seq_mask_tis already applies the token TIS weight; drop tis")
    needs_cap = "tis" in modes or "seq_mask_tis" in modes
    if needs_cap and a.tis_cap is None:
        raise ConfigError(f"config field 'algo.tis_cap': null, but {p}.modes has tis / seq_mask_tis (set the cap C)")
    if a.tis_cap is not None and not needs_cap:
        raise ConfigError(f"config field 'algo.tis_cap': {a.tis_cap!r} would have no effect: {p}.modes has neither "
                          "tis nor seq_mask_tis; remove it or add one")
    if rc.reject_kl_type not in REJECT_KL_TYPES:
        raise ConfigError(unknown_name_message(f"{p}.reject_kl_type", rc.reject_kl_type, REJECT_KL_TYPES))
    for lo, hi in (("icepop_low", "icepop_high"), ("seq_mask_low", "seq_mask_high")):
        if not 0 <= getattr(rc, lo) < getattr(rc, hi):
            raise ConfigError(f"config fields '{p}.{lo}', '{p}.{hi}': need 0 <= low < high "
                              f"(got {getattr(rc, lo)}, {getattr(rc, hi)})")
    for k in ("seq_is_cap", "token_reject_threshold", "seq_reject_threshold"):
        if not getattr(rc, k) > 0:
            raise ConfigError(f"config field '{p}.{k}': {getattr(rc, k)} must be > 0")
    owners = {"icepop_low": ("icepop",), "icepop_high": ("icepop",), "seq_mask_low": ("seq_mask_tis",),
              "seq_mask_high": ("seq_mask_tis",), "seq_is_cap": ("seq_is",), "token_reject_threshold": ("token_reject",),
              "seq_reject_threshold": ("seq_reject",), "reject_kl_type": ("token_reject", "seq_reject")}
    for k, need in owners.items():
        if getattr(rc, k) != getattr(d, k) and not any(m in modes for m in need):
            raise ConfigError(f"config field '{p}.{k}': {getattr(rc, k)!r} would have no effect: it acts only with "
                              f"{' / '.join(need)} in {p}.modes; remove it or add the mode")


BUILTIN_GENERATE_FNS = ("multi_turn",)  # rollout.generate_fn names (rfpo_megatron.train.custom_rollout)


def validate(cfg: Config) -> Config:
    """Check choices and ranges; raise ConfigError naming the field, the value and what is allowed."""

    def choice(path: str, value: str, options) -> None:
        if value not in options:
            raise ConfigError(unknown_name_message(path, value, options))

    def rng(path: str, value, lo=None, hi=None, lo_open=False) -> None:
        if value is None:
            return
        bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
        if bad:
            lo_s = "-inf" if lo is None else lo
            hi_s = "inf" if hi is None else hi
            bracket = "(" if lo_open else "["
            raise ConfigError(f"config field '{path}': {value} is outside the allowed range {bracket}{lo_s}, {hi_s}]")

    a, r, f = cfg.algo, cfg.rfpo, cfg.rfpo.fix
    choice("algo.adv_estimator", a.adv_estimator, ADV_ESTIMATOR_NAMES)
    choice("algo.policy_loss", a.policy_loss, POLICY_LOSS_NAMES)
    _inactive_algo_knobs(a)
    resolve_loss_defaults(a)
    choice("algo.loss_agg_mode", a.loss_agg_mode, LOSS_AGG_MODES)
    choice("algo.kl_loss_type", a.kl_loss_type, KL_TYPES)
    choice("algo.kl_in_reward_type", a.kl_in_reward_type, KL_TYPES)
    rng("algo.kl_target", a.kl_target, 0, None, lo_open=True)
    rng("algo.kl_horizon", a.kl_horizon, 1)
    rng("algo.kl_in_reward_coef", a.kl_in_reward_coef, 0, None)
    rng("algo.kl_loss_coef", a.kl_loss_coef, 0, None)
    rng("algo.clip_ratio_low", a.clip_ratio_low, 0, 1)
    rng("algo.clip_ratio_high", a.clip_ratio_high, 0, None)
    rng("algo.loss_agg_max_len", a.loss_agg_max_len, 1)
    rng("algo.pos_nll_coef", a.pos_nll_coef, 0, None)
    rng("algo.chord_mu", a.chord_mu, 0, 1)
    if a.clip_ratio_c is not None and a.clip_ratio_c <= 1:
        raise ConfigError(f"config field 'algo.clip_ratio_c': {a.clip_ratio_c} must be > 1 (dual-clip constant) or null")
    rng("algo.tis_cap", a.tis_cap, 0, None, lo_open=True)
    _validate_rollout_correction(a)
    rng("algo.gamma", a.gamma, 0, 1)
    rng("algo.lam", a.lam, 0, 1)
    rng("algo.max_response_len", a.max_response_len, 1)
    rng("algo.overlong_buffer_len", a.overlong_buffer_len, 0, a.max_response_len)
    rng("algo.max_gen_batches", a.max_gen_batches, 1)
    choice("rfpo.roff_mode", r.roff_mode, ("seq_sum", "seq_mean"))
    choice("rfpo.loss_form", r.loss_form, LOSS_FORMS)
    choice("rfpo.wrong_advantage", r.wrong_advantage, ("group", "zero"))
    choice("rfpo.offpolicy_shaping", r.offpolicy_shaping, OFFPOLICY_SHAPINGS)
    rng("rfpo.shaping_c", r.shaping_c, 0, None, lo_open=True)
    if r.offpolicy_shaping == "guide" and f.temperature is not None and f.temperature != cfg.rollout.temperature:
        raise ConfigError(f"config field 'rfpo.offpolicy_shaping'=guide compares the actor's log-probs at "
                          f"rollout.temperature={cfg.rollout.temperature} with the engine's fix log-probs at "
                          f"rfpo.fix.temperature={f.temperature}: set rfpo.fix.temperature=null (or equal)")
    rng("rfpo.roff_clip", r.roff_clip, 0, ROFF_CLIP_MAX, lo_open=True)
    if not f.variant:
        raise ConfigError("config field 'rfpo.fix.variant' is empty: name at least one of " + ", ".join(FIX_VARIANTS))
    for name in f.variant:
        choice("rfpo.fix.variant", name, FIX_VARIANTS)
    for name in f.templates:
        choice("rfpo.fix.templates", name, FIX_VARIANTS)
    choice("rfpo.fix.trigger", f.trigger, ("all_wrong", "any_wrong"))
    choice("rfpo.fix.placement", f.placement, ("replace", "append"))
    rng("rfpo.fix.max_per_group", f.max_per_group, 1)
    rng("rfpo.fix.attempts", f.attempts, 1)
    c = cfg.actor
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "micro_batch_size", "ppo_epochs"):
        rng(f"actor.{name}", getattr(c, name), 1)
    choice("actor.recompute", c.recompute, ("none", "selective", "full"))
    choice("actor.recompute_method", c.recompute_method, ("uniform", "block"))
    rng("actor.recompute_num_layers", c.recompute_num_layers, 1)
    if c.grad_reduce_bucket_size is not None:
        rng("actor.grad_reduce_bucket_size", c.grad_reduce_bucket_size, 1)
    if c.optimizer_cpu_offload and c.use_distributed_optimizer is False:
        raise ConfigError("config field 'actor.optimizer_cpu_offload': true needs actor.use_distributed_optimizer=true "
                          "(megatron's CPU-Adam offload shards the optimizer with the distributed optimizer)")
    if c.optimizer_cpu_offload and not c.bf16:
        raise ConfigError("config field 'actor.optimizer_cpu_offload': true needs actor.bf16=true (megatron's offload "
                          "optimizer keeps fp32 host copies of bf16 params; fp32 params cannot be offloaded)")
    choice("actor.packing", c.packing, ("auto", "thd", "pad"))
    choice("actor.router_replay", c.router_replay, ("off", "rollout"))
    if c.router_replay == "rollout" and c.recompute != "none" and c.pipeline_model_parallel_size > 1:
        raise ConfigError(f"config field 'actor.router_replay': rollout with actor.recompute={c.recompute} needs "
                          f"actor.pipeline_model_parallel_size=1 (got {c.pipeline_model_parallel_size}: the 1F1B "
                          "schedule recomputes a micro-batch after later ones set their routing); set recompute=none, "
                          "PP=1 or router_replay=off")
    rng("actor.expert_model_parallel_size", c.expert_model_parallel_size, 1)
    if c.expert_tensor_parallel_size is not None:
        rng("actor.expert_tensor_parallel_size", c.expert_tensor_parallel_size, 1)
    choice("actor.moe_token_dispatcher_type", c.moe_token_dispatcher_type, ("alltoall", "allgather"))
    for name in ("moe_aux_loss_coef", "moe_z_loss_coef"):
        if getattr(c, name) is not None:
            rng(f"actor.{name}", getattr(c, name), 0, None)
    if c.virtual_pipeline_model_parallel_size is not None:
        rng("actor.virtual_pipeline_model_parallel_size", c.virtual_pipeline_model_parallel_size, 1)
        if c.virtual_pipeline_model_parallel_size > 1 and c.pipeline_model_parallel_size < 2:
            raise ConfigError(
                f"config field 'actor.virtual_pipeline_model_parallel_size': {c.virtual_pipeline_model_parallel_size} "
                f"needs actor.pipeline_model_parallel_size > 1 (got {c.pipeline_model_parallel_size}); set it to null "
                "or raise the pipeline size (num_hidden_layers must be divisible by pp x vpp)")
    if c.context_parallel_size != 1:
        raise ConfigError(f"config field 'actor.context_parallel_size': {c.context_parallel_size} is not supported by "
                          "the actor yet; set it to 1")
    choice("actor.lr_decay_style", c.lr_decay_style, ("constant", "linear", "cosine"))
    rng("actor.lr", c.lr, 0, None)
    rng("actor.clip_grad", c.clip_grad, 0, None)
    k = cfg.critic
    rng("critic.lr", k.lr, 0, None)
    rng("critic.min_lr", k.min_lr, 0, k.lr)
    rng("critic.warmup_steps", k.warmup_steps, 0)
    rng("critic.weight_decay", k.weight_decay, 0, None)
    rng("critic.clip_grad", k.clip_grad, 0, None)
    rng("critic.cliprange_value", k.cliprange_value, 0, None, lo_open=True)
    rng("critic.ppo_epochs", k.ppo_epochs, 1)
    o = cfg.rollout
    choice("rollout.engine", o.engine, ("embedded", "sglang"))
    choice("rollout.weight_sync", o.weight_sync, ("auto", "tensor", "distributed", "disk"))
    choice("rollout.release_memory", o.release_memory, ("auto", "always", "never"))
    rng("rollout.n_samples", o.n_samples, 1)
    rng("rollout.temperature", o.temperature, 0, None)
    rng("rollout.top_p", o.top_p, 0, 1, lo_open=True)
    rng("rollout.max_new_tokens", o.max_new_tokens, 1)
    rng("rollout.mem_fraction_static", o.mem_fraction_static, 0, 1, lo_open=True)
    if o.router_url and not o.server_urls:
        raise ConfigError(f"config field 'rollout.router_url' ({o.router_url}) needs rollout.server_urls: the servers "
                          "behind the router (weights are synced to each); set both or neither")
    if o.generate_fn is not None:
        spec = str(o.generate_fn)
        mod, sep, fn = spec.rpartition(":")
        if spec not in BUILTIN_GENERATE_FNS and not (sep and mod.strip() and fn.strip().isidentifier()):
            raise ConfigError(f"config field 'rollout.generate_fn': '{spec}' is neither a built-in "
                              f"({', '.join(BUILTIN_GENERATE_FNS)}) nor 'pkg.module:fn' / 'path/file.py:fn'")
    rng("data.prompts_per_step", cfg.data.prompts_per_step, 1)
    validate_data(cfg.data)
    choice("logging.wandb_mode", cfg.logging.wandb_mode, ("auto", "online", "offline", "disabled"))
    rng("trainer.steps", cfg.trainer.steps, 0)
    choice("trainer.checkpoint_format", cfg.trainer.checkpoint_format, ("auto", "dist", "full"))
    cfg.trainer.skip_old_logprob_pass = str(cfg.trainer.skip_old_logprob_pass).lower()
    choice("trainer.skip_old_logprob_pass", cfg.trainer.skip_old_logprob_pass, ("auto", "false"))
    mode = str(cfg.trainer.async_mode)
    cfg.trainer.async_mode = "off" if mode.lower() in ("false", "off", "no") else mode  # YAML reads `off` as false
    choice("trainer.async_mode", cfg.trainer.async_mode, ("off", "one_step", "bounded"))
    rng("trainer.max_staleness", cfg.trainer.max_staleness, 1)
    if cfg.trainer.async_mode == "one_step" and cfg.trainer.max_staleness != 1:
        raise ConfigError(f"config field 'trainer.max_staleness'={cfg.trainer.max_staleness} with "
                          f"trainer.async_mode=one_step (which is staleness 1); use async_mode=bounded for more")
    if cfg.trainer.async_mode != "off" and cfg.rollout.colocate:
        raise ConfigError(f"config field 'trainer.async_mode'={cfg.trainer.async_mode} needs rollout.colocate=false: "
                          f"a colocated engine releases its memory while the actor trains, so it cannot generate then")
    if cfg.trainer.async_mode != "off" and cfg.rollout.generate_fn is not None:
        raise ConfigError(f"config field 'trainer.async_mode'={cfg.trainer.async_mode} with rollout.generate_fn: custom "
                          f"rollouts do not stamp weight versions yet; use async_mode=off")
    return cfg


def validate_data(d: DataConfig) -> None:
    """The data.* reward knobs: the error policy, the remote service's limits, the reward_fn spec's shape (a
    registered name or `module:attr` / `file.py:attr`; names and paths are resolved later, by the rewards)."""
    if d.reward_error_policy not in ("raise", "zero"):
        raise ConfigError(unknown_name_message("data.reward_error_policy", d.reward_error_policy, ("raise", "zero")))
    for name in ("prompt_key", "answer_key", "solution_key", "id_key"):
        if not str(getattr(d, name)).strip():
            raise ConfigError(f"config field 'data.{name}' is empty; name the record field")
    spec = str(d.reward_fn).strip()
    if not spec:
        raise ConfigError("config field 'data.reward_fn' is empty; name a verifier (math, code, ...) or 'module:fn'")
    if ":" in spec:
        target, _, attr = spec.rpartition(":")
        if not target or not attr.isidentifier():
            raise ConfigError(f"config field 'data.reward_fn': '{spec}' must look like 'pkg.module:fn' or "
                              "'path/to/file.py:fn'")
    for key in d.reward_kwargs:
        if not str(key).isidentifier():
            raise ConfigError(f"config field 'data.reward_kwargs': key '{key}' is not a valid argument name")
    if d.reward_url is not None:
        if not str(d.reward_url).startswith(("http://", "https://")):
            raise ConfigError(f"config field 'data.reward_url': '{d.reward_url}' must start with http:// or https://")
        if d.reward_kwargs:
            raise ConfigError("config field 'data.reward_kwargs' has no effect with data.reward_url (the reward "
                              "server takes its own --reward-kwargs); remove one of them")
    for name, lo in (("reward_url_batch_size", 1), ("reward_url_concurrency", 1), ("reward_url_attempts", 1)):
        if getattr(d, name) < lo:
            raise ConfigError(f"config field 'data.{name}': {getattr(d, name)} must be >= {lo}")
    for name in ("reward_url_timeout_s",):
        if not getattr(d, name) > 0:
            raise ConfigError(f"config field 'data.{name}': {getattr(d, name)} must be > 0")
    if d.reward_url_backoff_s < 0:
        raise ConfigError(f"config field 'data.reward_url_backoff_s': {d.reward_url_backoff_s} must be >= 0")


def config_from_dict(tree: dict) -> Config:
    """Build and validate a Config from a nested dict (YAML content after overrides)."""
    return validate(_build(Config, tree or {}, ""))


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load YAML `path` (optional), apply `key=value` overrides, validate. Relative paths in the YAML stay as
    written (resolved by the caller against the working directory)."""
    tree: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' not found (pass a YAML file, e.g. examples/tiny_cpu/config.yaml)")
        with open(path) as fh:
            try:
                tree = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (algo, rfpo, actor, ...)")
    apply_overrides(tree, overrides or [])
    return config_from_dict(tree)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (for W&B config, checkpoints and YAML dumps)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
