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
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import random
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from rfpo_megatron.config import Config, ConfigError, load_config, save_config, to_dict
from rfpo_megatron.data.types import RolloutGroup, Sample
from rfpo_megatron.logging.metrics import grad_signal_frac, group_flags, roff_metrics, rollout_metrics

STATE_FILE = "trainer_state.pt"
SEED_ROLLOUT, SEED_FIX, SEED_EVAL, SEED_REFILL = 0, 1, 2, 10  # sampling-seed streams (step_seed)
LATEST_FILE = "latest"


# ------------------------------------------------------------------------------------------- the loop

def train(cfg: Config) -> dict[str, float]:
    """Run `cfg.trainer.steps` steps (continuing from the latest checkpoint when `trainer.resume`).

    Returns the last step's metrics (rank 0; {} on other ranks).
    """
    rt = setup(cfg)
    metrics: dict[str, float] = {}
    try:
        for step in range(rt.step + 1, cfg.trainer.steps + 1):
            rt.snapshot = capture_state(rt)  # what a checkpoint of step-1 holds (used if preempted mid-step)
            metrics = train_one_step(rt, step)
            rt.step = step
            touch(cfg.trainer.heartbeat_file)
            if cfg.trainer.eval_interval and (step % cfg.trainer.eval_interval == 0 or step == cfg.trainer.steps):
                try:
                    with abortable(rt):  # rank 0 only, no collectives: SIGTERM just skips it
                        metrics.update(run_eval(rt, step))
                except Preempted:
                    rt.log(f"SIGTERM during the eval of step {step}: eval skipped")
            if rt.is_rank0:
                rt.logger.log(step, metrics)
            stop = stop_requested(rt)
            if stop or step == cfg.trainer.steps or (cfg.trainer.save_interval
                                                     and step % cfg.trainer.save_interval == 0):
                save_checkpoint(rt, step, capture_state(rt))
            if stop:
                rt.log(f"SIGTERM: saved checkpoint at step {step}; exiting")
                break
        if rt.is_rank0:
            rt.log(summary(rt))
    except Preempted:
        save_checkpoint(rt, rt.step, rt.snapshot)
        rt.log(f"SIGTERM during step {rt.step + 1}: saved the checkpoint of step {rt.step}; exiting")
    finally:
        teardown(rt)
    return metrics


def train_one_step(rt: "Runtime", step: int) -> dict[str, float]:
    """One RL step; returns its metrics (rollout/*, rfpo/*, train/*, perf/*)."""
    cfg, m, t_step = rt.cfg, {}, time.perf_counter()
    groups = collect_groups(rt, step, m) if rt.is_rank0 else None  # rollout + reward + fix (rank 0)
    if rt.is_rank0 and groups is not None and cfg.rollout.colocate:
        rt.engine.release_memory()  # colocated: the engine's weights + KV cache leave the GPUs while we train
    groups = broadcast_groups(rt, groups)
    if groups is None:  # rank 0 was preempted before anything changed: save step-1 and stop
        raise Preempted()

    with abortable(rt, collective=True), timed(m, "perf/logprob_time"):
        batch = build_batch(groups, rt.pad_id)
        logp = logprob_pass(rt.actor, sequences_for_logprob(batch))  # N + F tensors [T_i]
        old_logp, orig_logp = logp[:batch.n], logp[batch.n:]
        ref_logp = logprob_pass(rt.ref_actor, sequences_for_logprob(batch, originals=False)) \
            if rt.ref_actor is not None else None
    log_roff = compute_roff(cfg, batch, old_logp, orig_logp)  # [N], detached, 0 for unfixed
    adv = advantages(cfg, batch, old_logp, ref_logp)  # [N, T]
    with timed(m, "perf/train_time"):
        m.update(update_policy(rt, make_train_batch(cfg, batch, old_logp, ref_logp, log_roff, adv)))
    if not stop_requested(rt):  # on SIGTERM the engine is going away: the checkpoint holds the weights
        with timed(m, "perf/weight_sync_time"):
            sync_weights(rt, resume_memory=cfg.rollout.colocate)

    n_tok = sum(len(r) for r in batch.response_ids) + sum(len(p) for p in batch.prompt_ids)
    if rt.is_rank0:
        m.update(roff_metrics(log_roff, batch.is_fixed, cfg.rfpo.roff_clip))
        m["rfpo/grad_signal_frac"] = grad_signal_frac(adv.abs().sum(-1), batch.group_index, batch.num_groups)
        m.update(rt.tracker.metrics())
        m["rollout/generations_total"] = float(rt.counters.get("generations", 0))
        m["rollout/generated_tokens_total"] = float(rt.counters.get("generated_tokens", 0))
    m["perf/step_time"] = time.perf_counter() - t_step
    m["perf/tokens_per_s"] = n_tok / max(m["perf/step_time"], 1e-9)
    m["perf/train_tokens"] = float(n_tok)
    return m


def collect_groups(rt: "Runtime", step: int, m: dict) -> Optional[list[RolloutGroup]]:
    """Rank 0: rollout -> reward -> fix stage (-> dynamic sampling). None when SIGTERM interrupted it
    (multi-rank: the others learn it from the broadcast; single process: Preempted propagates)."""
    cfg = rt.cfg
    try:
        with abortable(rt), timed(m, "perf/rollout_time"):
            records = [rt.prompts[i] for i in rt.sampler.next_indices()]
            groups = rollout(rt, records, seed=step_seed(cfg, step))
        m.update(rollout_metrics(groups, cfg.rfpo.fix.success_threshold))
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
        return groups
    except Preempted:
        if rt.world_size == 1:
            raise
        return None


# ------------------------------------------------------------------------------------------ runtime

def summary(rt: "Runtime") -> str:
    """Where the run's outputs are (printed at the end)."""
    lines = ["run finished:",
             f"  metrics JSONL : {os.path.abspath(rt.logger.jsonl_path)}",
             f"  W&B run       : {os.path.abspath(rt.logger.wandb_dir) if rt.logger.wandb_dir else '(disabled)'}"
             + (f"  (upload: wandb sync {os.path.abspath(rt.logger.wandb_dir)})"
                if rt.logger.wandb is not None and rt.logger.wandb.mode == "offline" else ""),
             f"  checkpoint    : {os.path.abspath(rt.last_checkpoint) if rt.last_checkpoint else '(none)'}"]
    return "\n".join(lines)


class Preempted(Exception):
    """Raised (by the SIGTERM handler or the loop) to stop a step before it changed any state."""


@dataclass
class Runtime:
    """Everything the loop holds: config, parallel info, actor, engine, data, logger, tracker, step."""

    cfg: Config
    rank: int = 0
    world_size: int = 1
    actor: Any = None
    ref_actor: Any = None
    engine: Any = None
    tokenizer: Any = None
    prompt_format: Any = None
    prompts: Any = None
    sampler: Any = None
    verifier: Any = None
    eval_sets: dict = field(default_factory=dict)
    logger: Any = None
    tracker: Any = None
    pad_id: int = 0
    eos_ids: list = field(default_factory=list)
    step: int = 0
    snapshot: dict = field(default_factory=dict)
    stop: bool = False  # SIGTERM seen
    abortable: bool = False  # the current stage may be abandoned (no state changed yet)
    cleanup: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)  # cumulative generations / tokens (rollout budget)
    last_checkpoint: str = ""
    resumed_wandb_id: Optional[str] = None
    weight_group: Any = None  # rollout.weight_sync=distributed: the trainer -> servers process group

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def log(self, text: str) -> None:
        if self.is_rank0:
            print(f"[rfpo-megatron] {text}", flush=True)


@contextmanager
def timed(metrics: dict, key: str, accumulate: bool = False):
    """Add the wall time of the block (seconds) to metrics[key]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        metrics[key] = metrics.get(key, 0.0) + dt if accumulate else dt


@contextmanager
def abortable(rt: Runtime, collective: bool = False):
    """Inside the block a SIGTERM raises Preempted at once: nothing has changed state yet, so the step
    is dropped and the checkpoint of the previous step is written. Blocks that run collectives are
    abortable only in a single process (with several ranks the stop flag is agreed on at step end)."""
    can = rt.world_size == 1 or (rt.is_rank0 and not collective)
    if rt.stop and can:
        raise Preempted()
    rt.abortable = can
    try:
        yield
    finally:
        rt.abortable = False


def install_signal_handlers(rt: Runtime) -> None:
    """SIGTERM/SIGINT -> checkpoint and exit; SIGUSR1 -> dump all threads' stacks to stderr."""
    def on_term(signum, frame):
        first = not rt.stop
        rt.stop = True
        if first:
            print(f"[rfpo-megatron] rank {rt.rank}: got signal {signum}; checkpointing and exiting",
                  file=sys.stderr, flush=True)
        if rt.abortable:
            rt.abortable = False
            raise Preempted()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)


def stop_requested(rt: Runtime) -> bool:
    """Whether any rank saw SIGTERM (all ranks agree: MAX all-reduce when distributed)."""
    if rt.world_size == 1:
        return rt.stop
    import torch.distributed as dist

    flag = torch.tensor([1 if rt.stop else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    rt.stop = bool(flag.item())
    return rt.stop


def broadcast_groups(rt: Runtime, groups: Optional[list]) -> Optional[list]:
    """Rank 0's groups to every rank (None means "preempted: stop before the update")."""
    if rt.world_size == 1:
        return groups
    import torch.distributed as dist

    box = [groups]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def touch(path: Optional[str]) -> None:
    """Create `path` or bump its mtime (the watchdog's liveness signal)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a"):
        os.utime(path, None)


def step_seed(cfg: Config, step: int, stream: int = SEED_ROLLOUT) -> int:
    """The sampling seed of `stream` (rollout, fix, eval, refill rounds) at `step`: a pure function of
    (trainer.seed, step, stream), so a resumed run replays exactly what the uninterrupted one sampled."""
    from rfpo_megatron.rollout.base import derive_seed

    return derive_seed(int(cfg.trainer.seed), int(step), int(stream))


# ----------------------------------------------------------------------------------- rollout stages

def sampling_params(cfg: Config, n: int, seed: Optional[int], eos_ids: list, temperature=None,
                    max_new_tokens=None):
    from rfpo_megatron.rollout.base import SamplingParams

    r = cfg.rollout
    return SamplingParams(n=n, temperature=r.temperature if temperature is None else temperature,
                          top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens if max_new_tokens is None else max_new_tokens,
                          stop_token_ids=list(eos_ids), seed=seed)


def rollout(rt: Runtime, records: list, seed: int, n: Optional[int] = None,
            temperature: Optional[float] = None) -> list[RolloutGroup]:
    """Generate `n` (default rollout.n_samples) responses per record and score them -> one group each."""
    from rfpo_megatron.data.batching import build_prompts

    cfg = rt.cfg
    items = build_prompts(records, rt.tokenizer, rt.prompt_format, cfg.data.max_prompt_len)
    params = sampling_params(cfg, n or cfg.rollout.n_samples, seed, rt.eos_ids, temperature=temperature)
    results = rt.engine.generate([it.prompt_ids for it in items], params)
    groups = []
    for it, res in zip(items, results):
        samples = [Sample(prompt_ids=list(it.prompt_ids), response_ids=list(r.output_ids),
                          rollout_logprobs=list(r.logprobs), finish_reason=r.finish_reason, record=it.record,
                          response_text=rt.tokenizer.decode(r.output_ids, skip_special_tokens=True))
                   for r in res]
        groups.append(RolloutGroup(prompt_ids=list(it.prompt_ids), samples=samples, record=it.record,
                                   prompt_text=it.prompt_text))
    score_samples(rt, [s for g in groups for s in g.samples])
    rt.counters["generations"] = rt.counters.get("generations", 0) + sum(len(g.samples) for g in groups)
    rt.counters["generated_tokens"] = rt.counters.get("generated_tokens", 0) + sum(
        len(s.response_ids) for g in groups for s in g.samples)
    return groups


def score_samples(rt: Runtime, samples: list[Sample]) -> None:
    """Fill `reward` and `reward_message` of each sample (verifier on the decoded text; DAPO overlong
    shaping added when algo.overlong_buffer_len > 0)."""
    from rfpo_megatron.rewards import score_many

    answer_key = rt.cfg.data.answer_key
    results = score_many(rt.verifier, [(s.response_text, str(s.record.get(answer_key, "")), s.record)
                                       for s in samples])
    a = rt.cfg.algo
    for s, res in zip(samples, results):
        s.reward, s.reward_message = float(res.reward), res.message
        if a.overlong_buffer_len > 0:
            s.reward += overlong_penalty(len(s.response_ids), a.max_response_len, a.overlong_buffer_len,
                                         a.overlong_penalty_factor)


def fix_stage(rt: Runtime, groups: list[RolloutGroup], seed: int) -> tuple[list[RolloutGroup], dict]:
    """RFPO fix stage on rank 0 (rfpo_megatron.fix.run_fix_stage): places the successful fixes into
    `groups` and returns (groups, rfpo/* metrics). Fix generations are counted for the rollout budget."""
    from rfpo_megatron.fix import run_fix_stage

    cfg = rt.cfg
    gen_count, gen_tokens = [0], [0]

    def generate(prompt_ids: list, n: int, sampling: dict) -> list:
        params = sampling_params(cfg, n, sampling.get("seed", seed), rt.eos_ids,
                                 temperature=sampling.get("temperature"),
                                 max_new_tokens=sampling.get("max_new_tokens"))
        out = rt.engine.generate(prompt_ids, params)
        gen_count[0] += sum(len(o) for o in out)
        gen_tokens[0] += sum(len(r.output_ids) for o in out for r in o)
        return out

    res = run_fix_stage(groups, generate, cfg=cfg, tokenizer=rt.tokenizer, seed=seed,
                        sampling={"temperature": cfg.rollout.temperature,
                                  "max_new_tokens": cfg.rollout.max_new_tokens},
                        score=lambda samples: score_samples(rt, samples))
    metrics = {k: float(v) for k, v in res.metrics.items() if not k.startswith("perf/")}
    metrics["rfpo/fix_generations"] = float(gen_count[0])
    metrics["rfpo/fix_generated_tokens"] = float(gen_tokens[0])
    rt.counters["generations"] = rt.counters.get("generations", 0) + gen_count[0]
    rt.counters["generated_tokens"] = rt.counters.get("generated_tokens", 0) + gen_tokens[0]
    return list(res.groups), metrics


def dynamic_sampling(rt: Runtime, groups: list[RolloutGroup], step: int, m: dict) -> list[RolloutGroup]:
    """DAPO: drop groups whose rewards are all equal and refill from extra prompts, at most
    algo.max_gen_batches generation rounds in all; never aborts (trains on what is there, logged)."""
    cfg = rt.cfg
    want = cfg.data.prompts_per_step
    kept = [g for g in groups if not all_equal(g.rewards)]
    rounds = 1
    while len(kept) < want and rounds < cfg.algo.max_gen_batches:
        records = [rt.prompts[i] for i in rt.sampler.next_indices()]
        extra = rollout(rt, records, seed=step_seed(cfg, step, SEED_REFILL + 2 * rounds))
        if cfg.rfpo.enabled:
            extra, _ = fix_stage(rt, extra, seed=step_seed(cfg, step, SEED_REFILL + 2 * rounds + 1))
        kept += [g for g in extra if not all_equal(g.rewards)]
        rounds += 1
    m["rollout/dynamic_sampling_rounds"] = float(rounds)
    m["rollout/dynamic_sampling_short"] = float(len(kept) < want)
    if not kept:  # every group constant: train on the originals (zero advantage) rather than nothing
        kept = groups
    return kept[:want] if len(kept) > want else kept


def all_equal(values: list[float]) -> bool:
    return all(v == values[0] for v in values)


# ------------------------------------------------------------------------------ the actor-side batch

@dataclass
class StepBatch:
    """The step's sequences, flattened over groups (N sequences; F of them fixed).

    prompt_ids:   N lists [P_i] (the PLAIN prompt q, also for fixed samples).
    response_ids: N lists [T_i].
    rollout_logp: N lists [T_i] (engine log-probs; under the fix prompt for fixed samples).
    rewards: [N]; group_index: [N] long (dense 0..num_groups-1); is_fixed, use_tis: [N] bool.
    response_mask: [N, T] bool (T = longest response).
    fixed_rows: [F] rows of the fixed samples; orig_response_ids: F lists, the original wrong o of each.
    """

    prompt_ids: list
    response_ids: list
    rollout_logp: list
    rewards: torch.Tensor
    group_index: torch.Tensor
    is_fixed: torch.Tensor
    use_tis: torch.Tensor
    response_mask: torch.Tensor
    fixed_rows: list
    orig_response_ids: list
    num_groups: int

    @property
    def n(self) -> int:
        return len(self.response_ids)


def build_batch(groups: list[RolloutGroup], pad_id: int = 0) -> StepBatch:
    """Flatten groups into a StepBatch (see its docstring for shapes)."""
    from rfpo_megatron.data.batching import pad_right

    prompt_ids, response_ids, rollout_logp, rewards, gidx, fixed, tis = [], [], [], [], [], [], []
    fixed_rows, orig = [], []
    for gi, g in enumerate(groups):
        for s in g.samples:
            if s.is_fixed:
                if not s.fixed_from:
                    raise ValueError("a fixed sample has no `fixed_from` (the original wrong response)")
                fixed_rows.append(len(response_ids))
                orig.append(list(s.fixed_from))
            prompt_ids.append(list(s.prompt_ids))
            response_ids.append(list(s.response_ids))
            rollout_logp.append(list(s.rollout_logprobs))
            rewards.append(float(s.reward))
            gidx.append(gi)
            fixed.append(bool(s.is_fixed))
            tis.append(bool(s.use_tis) and not s.is_fixed)
    _, mask = pad_right(response_ids, pad_id)
    return StepBatch(prompt_ids, response_ids, rollout_logp, torch.tensor(rewards, dtype=torch.float32),
                     torch.tensor(gidx, dtype=torch.long), torch.tensor(fixed, dtype=torch.bool),
                     torch.tensor(tis, dtype=torch.bool), mask, fixed_rows, orig, len(groups))


def sequences_for_logprob(batch: StepBatch, originals: bool = True) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) pairs for the actor's log-prob pass: the N batch rows, then (when
    `originals`) for each fixed row its original wrong response o on the SAME plain prompt q."""
    seqs = list(zip(batch.prompt_ids, batch.response_ids))
    if originals:
        seqs += [(batch.prompt_ids[r], o) for r, o in zip(batch.fixed_rows, batch.orig_response_ids)]
    return seqs


def _pad(rows: list, fill: float = 0.0) -> torch.Tensor:
    """B tensors/lists [R_i] -> [B, R_max] float (right-padded with `fill`)."""
    R = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), R), fill, dtype=torch.float32)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = torch.as_tensor(r, dtype=torch.float32)
    return out


def compute_roff(cfg: Config, batch: StepBatch, old_logp: list, orig_logp: list) -> torch.Tensor:
    """[N] log R_off per sequence, detached: gamma * (S(o) - S(o_f)) on the fixed rows (clamped to
    +-rfpo.roff_clip), 0 elsewhere. old_logp: N tensors [T_i] (rows of the batch, plain prompt);
    orig_logp: F tensors [T0_j] (the original wrong o of each fixed row, same plain prompt)."""
    from rfpo_megatron.algos.rfpo import compute_log_roff

    log_roff = torch.zeros(batch.n, dtype=torch.float32)
    if not cfg.rfpo.enabled or not batch.fixed_rows:
        return log_roff
    rows = batch.fixed_rows
    fixed_lp, fixed_mask = _pad([old_logp[r] for r in rows]), _pad_mask([len(old_logp[r]) for r in rows])
    orig_lp, orig_mask = _pad(list(orig_logp)), _pad_mask([len(o) for o in orig_logp])
    lr = compute_log_roff(orig_lp, orig_mask, fixed_lp, fixed_mask, torch.ones(len(rows), dtype=torch.bool),
                          mode=cfg.rfpo.roff_mode, gamma=cfg.rfpo.gamma, clip=cfg.rfpo.roff_clip)
    log_roff[torch.tensor(rows, dtype=torch.long)] = lr.float()
    return log_roff.detach()


def _pad_mask(lens: list) -> torch.Tensor:
    """[B, max(lens)] bool, True on the first lens[i] positions of row i."""
    T = max(lens + [1])
    return torch.arange(T).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)


def advantages(cfg: Config, batch: StepBatch, old_logp: list, ref_logp: Optional[list]) -> torch.Tensor:
    """[N, T] advantages from the registry estimator `algo.adv_estimator` (0 on padding); rows dropped by
    the estimator's keep mask (reinforce_rej, raft) are zeroed in `batch.response_mask`."""
    from rfpo_megatron.algos.advantages import compute_advantages, sample_keep_mask

    a = cfg.algo
    kw: dict[str, Any] = {"norm_adv_by_std": a.norm_adv_by_std, "gamma": a.gamma, "lam": a.lam,
                          "old_logp": _pad(list(old_logp)), "kl_in_reward_coef": a.kl_in_reward_coef,
                          "kl_in_reward_type": a.kl_loss_type}
    if ref_logp is not None:
        kw["ref_logp"] = _pad(list(ref_logp))
    elif a.adv_estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        kw["ref_logp"] = kw["old_logp"]  # no reference model: the KL term is 0
    if a.adv_estimator == "gae":
        raise ConfigError("algo.adv_estimator=gae needs a critic, which this trainer does not build; "
                          "use grpo, rloo, reinforce_pp, ... (docs/algorithms.md)")
    if a.adv_estimator == "remax":
        raise ConfigError("algo.adv_estimator=remax needs greedy baseline rollouts, not wired in this trainer; "
                          "use grpo or rloo")
    mask = batch.response_mask
    adv, _ = compute_advantages(a.adv_estimator, rewards=batch.rewards, group_ids=batch.group_index,
                                response_mask=mask, **kw)
    keep = sample_keep_mask(a.adv_estimator, batch.rewards, batch.group_index)
    batch.response_mask = mask & keep.unsqueeze(-1)
    return adv.float() * batch.response_mask


def make_train_batch(cfg: Config, batch: StepBatch, old_logp: list, ref_logp: Optional[list],
                     log_roff: torch.Tensor, adv: torch.Tensor):
    """The actor's ActorBatch for train_step. TIS weights min(exp(old - rollout), tis_cap) on unfixed
    rows and exactly 1 on fixed rows (their rollout log-probs were under the fix prompt)."""
    from rfpo_megatron.actor.batch import ActorBatch

    lens = [len(r) for r in batch.response_ids]
    tis = None
    if cfg.algo.tis_cap is not None:
        tis = [tis_weights(old_logp[i], batch.rollout_logp[i], cfg.algo.tis_cap, bool(batch.use_tis[i]))
               for i in range(batch.n)]
    return ActorBatch.from_prompt_response(
        batch.prompt_ids, batch.response_ids,
        advantages=[adv[i, :lens[i]] for i in range(batch.n)],
        old_logp=[torch.as_tensor(old_logp[i]).float() for i in range(batch.n)],
        ref_logp=[torch.as_tensor(r).float() for r in ref_logp] if ref_logp is not None else None,
        rollout_logp=None, tis_weights=tis,
        response_mask=[batch.response_mask[i, :lens[i]] for i in range(batch.n)],
        log_roff=log_roff if cfg.rfpo.enabled else None, is_fixed=batch.is_fixed)


def update_policy(rt: Runtime, tb: Any) -> dict[str, float]:
    """actor.ppo_epochs passes over the batch in mini-batches of actor.global_batch_size sequences (None:
    the whole batch), one optimizer step each; returns the train/* metrics averaged over the steps."""
    cfg = rt.cfg
    n, size = len(tb), cfg.actor.global_batch_size or len(tb)
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(cfg.actor.ppo_epochs):
        for start in range(0, n, size):
            mb = subset_batch(tb, list(range(start, min(n, start + size))))
            if not any(bool(mb.mask_of(i).any()) for i in range(len(mb))):
                continue  # nothing in the loss (e.g. every row dropped by the estimator's keep mask)
            for k, v in rt.actor.train_step(mb, cfg.algo, cfg.rfpo if cfg.rfpo.enabled else None).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
    out = {k: v / steps for k, v in sums.items()} if steps else {"train/loss": 0.0, "train/grad_norm": 0.0}
    out["train/optimizer_steps"] = float(steps)
    return out


def subset_batch(tb: Any, idx: list) -> Any:
    """The ActorBatch rows `idx` (all per-sample fields sliced alike)."""
    if len(idx) == len(tb):
        return tb
    from rfpo_megatron.actor.batch import ActorBatch

    def pick(v):
        return None if v is None else [v[i] for i in idx]

    ix = torch.tensor(idx, dtype=torch.long)
    return ActorBatch(input_ids=pick(tb.input_ids), prompt_lens=pick(tb.prompt_lens), advantages=pick(tb.advantages),
                      old_logp=pick(tb.old_logp), ref_logp=pick(tb.ref_logp), rollout_logp=pick(tb.rollout_logp),
                      tis_weights=pick(tb.tis_weights), response_mask=pick(tb.response_mask),
                      log_roff=None if tb.log_roff is None else tb.log_roff[ix],
                      is_fixed=None if tb.is_fixed is None else tb.is_fixed[ix])


def tis_weights(old_logp, rollout_logp, cap: float, use_tis: bool) -> torch.Tensor:
    """[T] truncated importance weights min(exp(old_logp - rollout_logp), cap); all 1 when `use_tis` is
    False (fixed samples) or the engine reported no log-probs."""
    old = torch.as_tensor(old_logp, dtype=torch.float32)
    if not use_tis or len(rollout_logp) != old.numel():
        return torch.ones_like(old)
    return torch.clamp(torch.exp(old - torch.as_tensor(rollout_logp, dtype=torch.float32)), max=cap)


def overlong_penalty(length: int, max_len: int, buffer_len: int, factor: float) -> float:
    """DAPO overlong shaping of one response length (algos.shaping)."""
    from rfpo_megatron.algos.shaping import overlong_penalty as shaping

    return float(shaping(torch.tensor([length]), max_response_len=max_len, overlong_buffer_len=buffer_len,
                         overlong_penalty_factor=factor)[0])


def logprob_pass(actor: Any, seqs: list) -> list:
    """Per-token log-probs of each (prompt ids, response ids) pair under `actor`: list of [T_i] tensors.
    The prompt ids are exactly those given (for a fixed sample: the plain prompt q)."""
    from rfpo_megatron.actor.batch import ActorBatch

    prompts, responses = [list(p) for p, _ in seqs], [list(r) for _, r in seqs]
    logp, _ = actor.compute_logprobs(ActorBatch.from_prompt_response(prompts, responses))
    return logp


# ------------------------------------------------------------------------------------- weight sync

def sync_weights(rt: Runtime, resume_memory: bool = False) -> None:
    """Push the actor's weights to the rollout engine as HF-named tensors, in buckets
    (rollout.weight_sync_bucket_mb). Collective over TP (gathers shards); with PP each stage pushes its own
    layers; only TP rank 0 / DP rank 0 of each stage talks to the engine. `resume_memory`: the engine
    released its memory (rollout.colocate): re-allocate the weights first, the KV cache after."""
    from rfpo_megatron.convert.export import iter_hf_weights

    if resume_memory and rt.is_rank0:
        rt.engine.resume_memory(["weights"])
    _barrier(rt)
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
    _barrier(rt)
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


def _barrier(rt: Runtime) -> None:
    if rt.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# -------------------------------------------------------------------------------------- checkpoints

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


def checkpoint_dir(save_dir: str, step: int) -> str:
    return os.path.join(save_dir, f"step_{step:06d}")


def save_checkpoint(rt: Runtime, step: int, state: dict) -> str:
    """Write `save_dir/step_NNNNNN/` (actor checkpoint + trainer_state.pt), then point `latest` at it.
    A kill at any moment leaves the previous complete checkpoint as `latest`."""
    cfg = rt.cfg
    final = checkpoint_dir(cfg.trainer.save_dir, step)
    tmp = final + ".tmp"
    if rt.is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    _barrier(rt)
    from rfpo_megatron.actor.checkpoint import save_checkpoint as save_actor

    save_actor(rt.actor, os.path.join(tmp, "actor"), step=step)
    _barrier(rt)
    if rt.is_rank0:
        torch.save({"step": step, "config": to_dict(cfg), **state}, os.path.join(tmp, STATE_FILE))
        save_config(cfg, os.path.join(tmp, "config.yaml"))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(os.path.join(cfg.trainer.save_dir, LATEST_FILE + ".tmp"), "w") as fh:
            fh.write(os.path.basename(final) + "\n")
        os.replace(os.path.join(cfg.trainer.save_dir, LATEST_FILE + ".tmp"),
                   os.path.join(cfg.trainer.save_dir, LATEST_FILE))
        prune_checkpoints(cfg.trainer.save_dir, cfg.trainer.keep_last)
        rt.last_checkpoint = final
    _barrier(rt)
    return final


def prune_checkpoints(save_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete step directories (keep_last <= 0 keeps all)."""
    if keep_last <= 0:
        return
    steps = sorted(d for d in os.listdir(save_dir) if d.startswith("step_") and not d.endswith(".tmp"))
    for d in steps[:-keep_last]:
        shutil.rmtree(os.path.join(save_dir, d), ignore_errors=True)


def latest_checkpoint(save_dir: str) -> Optional[str]:
    """The directory `save_dir/latest` names, or None when there is no complete checkpoint."""
    path = os.path.join(save_dir, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        name = fh.read().strip()
    d = os.path.join(save_dir, name)
    if not os.path.isfile(os.path.join(d, STATE_FILE)):
        raise FileNotFoundError(f"{path} names '{name}' but {d}/{STATE_FILE} is missing; "
                                f"point {path} at a complete step_* directory or start without --resume")
    return d


def load_checkpoint(rt: Runtime, ckpt: str) -> int:
    """Restore the actor and the trainer state from `ckpt`; returns its step."""
    from rfpo_megatron.actor.checkpoint import load_checkpoint as load_actor

    state = torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=False)
    load_actor(rt.actor, os.path.join(ckpt, "actor"))
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


# --------------------------------------------------------------------------------- setup / teardown

def engine_config(cfg: Config) -> dict:
    """The rollout section mapped onto rfpo_megatron.rollout.launch.EngineConfig field names."""
    r = cfg.rollout
    return {"backend": "external" if r.server_urls else r.engine, "urls": list(r.server_urls),
            "model_path": cfg.actor.hf_model_path, "log_dir": os.path.join(cfg.logging.log_dir, "rollout_logs"),
            "startup_timeout_s": r.startup_timeout_s, "request_timeout_s": r.request_timeout_s,
            "watchdog_s": r.watchdog_s, "tp_size": r.sglang_tp, "num_gpus": r.num_servers * r.sglang_tp,
            "server_args": dict(r.server_args), "threads": int(os.environ.get("OMP_NUM_THREADS", "1") or 1)}


def check_paths(cfg: Config) -> None:
    """Fail early, naming the config field, when an input path is missing."""
    if not cfg.actor.hf_model_path or not os.path.isfile(os.path.join(cfg.actor.hf_model_path, "config.json")):
        raise ConfigError(f"actor.hf_model_path='{cfg.actor.hf_model_path}' is not an HF model directory "
                          f"(no config.json); for the demo run examples/tiny_cpu/prepare.py first")
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty; list the jsonl/parquet prompt files to train on")
    for path in list(cfg.data.train_files) + list(cfg.data.eval_files):
        if not os.path.exists(path):
            raise ConfigError(f"data file '{path}' not found (data.train_files / data.eval_files)")


def build_actor(cfg: Config, with_optimizer: bool = True) -> Any:
    """The megatron-core actor initialised from the HF weights of actor.hf_model_path."""
    from transformers import AutoConfig

    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.convert.offline import load_hf_into_model

    hf_config = AutoConfig.from_pretrained(cfg.actor.hf_model_path)
    actor = Actor(hf_config, cfg.actor, total_steps=max(1, cfg.trainer.steps),
                  temperature=cfg.rollout.temperature, with_optimizer=with_optimizer)
    load_hf_into_model(actor.modules, cfg.actor.hf_model_path)
    return actor


def setup(cfg: Config) -> Runtime:
    """Parallel init, tokenizer, data, verifier, actor (+ reference), engine, resume, logger, signals."""
    from transformers import AutoTokenizer

    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.data.dataset import load_prompt_sets
    from rfpo_megatron.data.sampler import PromptSampler
    from rfpo_megatron.data.template import PromptFormat
    from rfpo_megatron.logging import MetricsLogger
    from rfpo_megatron.logging.metrics import InternalizationTracker
    from rfpo_megatron.rewards import get_reward_fn

    check_paths(cfg)
    sync_mode(cfg)  # a bad weight_sync choice fails now, not after the first step
    data_kw = dict(skip_bad_records=cfg.data.skip_bad_records, prompt_key=cfg.data.prompt_key,
                   answer_key=cfg.data.answer_key)
    prompts = load_prompt_sets(list(cfg.data.train_files), **data_kw).records  # bad data fails before init
    eval_sets = {os.path.splitext(os.path.basename(p))[0]: load_prompt_sets([p], **data_kw).records
                 for p in cfg.data.eval_files}
    from rfpo_megatron.rewards import available_rewards

    if cfg.data.reward_fn not in available_rewards():
        raise ConfigError(f"data.reward_fn='{cfg.data.reward_fn}' is unknown; choose one of: "
                          f"{', '.join(available_rewards())}")
    single = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1) == 1
    if single and "MASTER_PORT" not in os.environ:  # a lone process: never collide on the default port
        from rfpo_megatron.rollout.procs import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    info = init_parallel(cfg.actor.tensor_model_parallel_size, cfg.actor.pipeline_model_parallel_size,
                         seed=cfg.trainer.seed)
    rt = Runtime(cfg, rank=info.rank, world_size=info.world_size, prompts=prompts,
                 eval_sets=eval_sets if info.rank == 0 else {})
    if rt.is_rank0:  # only rank 0 scores (a process-pool verifier would otherwise start on every rank)
        rt.verifier = get_reward_fn(cfg.data.reward_fn)
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
    if rt.is_rank0:
        rt.engine = launch_rollout_engine(cfg)
        rt.cleanup.append(rt.engine.shutdown)
    share_engine(rt)
    resumed = False
    if cfg.trainer.resume:
        ckpt = latest_checkpoint(cfg.trainer.save_dir)
        if ckpt is None:
            rt.log(f"--resume: no checkpoint in {cfg.trainer.save_dir}; starting from step 0")
        else:
            rt.step = load_checkpoint(rt, ckpt)
            rt.last_checkpoint = ckpt
            resumed = True
            rt.log(f"resumed from {ckpt} (step {rt.step})")
    elif cfg.actor.load:  # start from a Megatron checkpoint's weights (fresh optimizer and data position)
        from rfpo_megatron.actor.checkpoint import load_checkpoint as load_actor

        load_actor(rt.actor, cfg.actor.load, load_optimizer=False, load_rng=False)
        resumed = True
    if resumed:
        sync_weights(rt)  # the engine serves the HF start weights; give it the restored ones
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


# ------------------------------------------------------------------------------------------ eval

def run_eval(rt: Runtime, step: int) -> dict[str, float]:
    """eval/<set>/avg@k and pass@k on data.eval_files with the engine's current weights (rank 0)."""
    if not rt.is_rank0 or not rt.eval_sets:
        return {}
    from rfpo_megatron.evaluate import evaluate_sets

    m: dict[str, float] = {}
    with timed(m, "perf/eval_time"):
        m.update(evaluate_sets(rt.engine, rt.tokenizer, rt.verifier, rt.eval_sets, rt.cfg,
                               seed=step_seed(rt.cfg, step, SEED_EVAL), eos_ids=rt.eos_ids,
                               prompt_format=rt.prompt_format))
    return m


# ------------------------------------------------------------------------------------------ main

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
