"""The actor-side batch of a step: StepBatch, the log-prob pass, R_off, advantages, TIS and the policy update.

Runs on every rank after the groups were broadcast. N = sequences of the step, F = fixed ones among them,
T = longest response.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from rfpo_megatron.config import Config, ConfigError
from rfpo_megatron.data.types import RolloutGroup
from rfpo_megatron.train.runtime import Runtime


@dataclass
class StepBatch:
    """The step's sequences, flattened over groups (N sequences; F of them fixed).

    prompt_ids:   N lists [P_i] (the PLAIN prompt q, also for fixed samples).
    response_ids: N lists [T_i].
    rollout_logp: N lists [T_i] (engine log-probs; under the fix prompt for fixed samples).
    rewards: [N]; group_index: [N] long (dense 0..num_groups-1); is_fixed, use_tis: [N] bool.
    response_mask: [N, T] bool (T = longest response).
    fixed_rows: [F] rows of the fixed samples; orig_response_ids: F lists, the original wrong o of each.
    baseline_rewards: [N] the row's group `baseline_reward` (greedy reward, ReMax), or None when a group
    has none.
    values, returns: [N, T] critic values and GAE returns (algo.adv_estimator=gae only, set by `advantages`).
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
    baseline_rewards: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

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
    base = None
    if groups and all(g.baseline_reward is not None for g in groups):
        base = torch.tensor([float(groups[gi].baseline_reward) for gi in gidx], dtype=torch.float32)
    return StepBatch(prompt_ids, response_ids, rollout_logp, torch.tensor(rewards, dtype=torch.float32),
                     torch.tensor(gidx, dtype=torch.long), torch.tensor(fixed, dtype=torch.bool),
                     torch.tensor(tis, dtype=torch.bool), mask, fixed_rows, orig, len(groups), base)


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


def kl_controller(cfg: Config):
    """The step-to-step β of the KL in the reward: fixed `algo.kl_in_reward_coef`, or adaptive (PPO/verl) when
    `algo.kl_target` is set (horizon `algo.kl_horizon`). Keep one per run and pass it to `advantages`."""
    from rfpo_megatron.algos.kl import AdaptiveKLController

    a = cfg.algo
    return AdaptiveKLController(a.kl_in_reward_coef, a.kl_target, a.kl_horizon)


def step_advantages(rt: Runtime, batch: StepBatch, old_logp: list, ref_logp: Optional[list],
                    values: Optional[torch.Tensor], metrics: dict) -> torch.Tensor:
    """`advantages` for the trainer's step: the adaptive KL-in-reward β lives in rt.counters
    ("kl_in_reward_coef"), so it is checkpointed and resumed with the other counters."""
    cfg = rt.cfg
    ctrl = None
    if cfg.algo.use_kl_in_reward:
        ctrl = kl_controller(cfg)
        ctrl.value = float(rt.counters.get("kl_in_reward_coef", ctrl.value))
    adv = advantages(cfg, batch, old_logp, ref_logp, values, kl_ctrl=ctrl, metrics=metrics)
    if ctrl is not None:
        rt.counters["kl_in_reward_coef"] = ctrl.value
    return adv


def advantages(cfg: Config, batch: StepBatch, old_logp: list, ref_logp: Optional[list],
               values: Optional[torch.Tensor] = None, kl_ctrl: Any = None,
               metrics: Optional[dict] = None) -> torch.Tensor:
    """[N, T] advantages from the registry estimator `algo.adv_estimator` (0 on padding); rows dropped by
    the estimator's keep mask (reinforce_rej, raft) are zeroed in `batch.response_mask`. gae needs the critic's
    `values` [N, T] (train.critic.value_pass); it stores them and the returns [N, T] on the batch.

    KL in the reward (only with `algo.use_kl_in_reward`, any estimator; needs ref_logp): per-token penalty
    −β·k(old_logp, ref_logp) with k = `algo.kl_in_reward_type`; token-level estimators (reinforce_pp(_baseline),
    gae) get it per token, the others get the sequence reward r_i − β·Σ_t k_t (as verl). β comes from `kl_ctrl`
    (`kl_controller(cfg)`; adaptive when algo.kl_target is set: updated here with this step's KL) or is
    algo.kl_in_reward_coef. Keep masks (reinforce_rej, raft) and wrong/positive flags use the outcome rewards.
    `rfpo.wrong_advantage=zero`: the wrong samples of a group that holds a fix get advantage 0 (the fix alone
    carries the signal). `metrics` (optional dict) receives rfpo/kl_in_reward and train/kl_in_reward_coef."""
    from rfpo_megatron.algos.advantages import compute_advantages, sample_keep_mask
    from rfpo_megatron.algos.kl import kl_estimate
    from rfpo_megatron.algos.stats import place_at_last_token

    a = cfg.algo
    mask = batch.response_mask
    old = _pad(list(old_logp))
    kw: dict[str, Any] = {"norm_adv_by_std": a.norm_adv_by_std, "gamma": a.gamma, "lam": a.lam,
                          "old_logp": old, "kl_in_reward_coef": 0.0, "kl_in_reward_type": a.kl_in_reward_type}
    rewards = batch.rewards
    if a.use_kl_in_reward:
        if ref_logp is None:
            raise ConfigError("algo.use_kl_in_reward=true needs the reference model's log-probs (the trainer builds "
                              "the reference actor when use_kl_in_reward is set)")
        ref = _pad(list(ref_logp))
        kw["ref_logp"] = ref
        beta = float(kl_ctrl.value) if kl_ctrl is not None else float(a.kl_in_reward_coef)
        m = mask
        kl = torch.where(m, kl_estimate(old.double(), ref.double(), a.kl_in_reward_type), torch.zeros((), dtype=torch.float64))
        if a.adv_estimator in ("reinforce_pp", "reinforce_pp_baseline"):
            kw["kl_in_reward_coef"] = beta  # the estimator subtracts β·k per token itself
        elif a.adv_estimator == "gae":
            kw["token_level_rewards"] = place_at_last_token(rewards.double(), m) - beta * kl
        else:
            rewards = (rewards.double() - beta * kl.sum(-1)).to(rewards.dtype)
        n_tok = m.sum(-1).clamp(min=1)
        cur_kl = float((kl.sum(-1) / n_tok)[m.any(-1)].mean()) if bool(m.any()) else 0.0
        if metrics is not None:
            metrics["rfpo/kl_in_reward"] = cur_kl
            metrics["train/kl_in_reward_coef"] = beta
        if kl_ctrl is not None:
            kl_ctrl.update(cur_kl, batch.n)
    if a.adv_estimator == "gae":
        if values is None:
            raise ConfigError("algo.adv_estimator=gae needs the critic's values (train.critic.value_pass); "
                              "the trainer builds the critic when algo.adv_estimator=gae")
        kw["values"] = values.float()
    if a.adv_estimator == "remax":  # r_i - reward of the greedy response to the prompt (train.generation.rollout)
        if batch.baseline_rewards is None:
            raise ValueError("algo.adv_estimator=remax: a group has no baseline_reward (greedy response reward); "
                             "the groups must come from train.generation.rollout(..., baseline=True)")
        kw["baseline_rewards"] = batch.baseline_rewards
    adv, returns = compute_advantages(a.adv_estimator, rewards=rewards, group_ids=batch.group_index,
                                      response_mask=mask, **kw)
    if a.adv_estimator == "gae":
        batch.values, batch.returns = values.float() * mask, returns.float() * mask
    keep = sample_keep_mask(a.adv_estimator, batch.rewards, batch.group_index)
    batch.response_mask = mask & keep.unsqueeze(-1)
    adv = adv.float() * batch.response_mask
    if cfg.rfpo.enabled and cfg.rfpo.wrong_advantage == "zero" and bool(batch.is_fixed.any()):
        has_fix = torch.zeros(batch.num_groups, dtype=torch.bool).index_fill_(0, batch.group_index[batch.is_fixed], True)
        wrong = (batch.rewards <= cfg.rfpo.fix.threshold) & ~batch.is_fixed & has_fix[batch.group_index]
        adv = torch.where(wrong.unsqueeze(-1), torch.zeros_like(adv), adv)
    return adv


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
        log_roff=log_roff if cfg.rfpo.enabled else None, is_fixed=batch.is_fixed,
        is_positive=batch.rewards >= cfg.rfpo.fix.success_threshold)


def update_policy(rt: Runtime, tb: Any) -> dict[str, float]:
    """actor.ppo_epochs passes over the batch in mini-batches of actor.global_batch_size sequences (None:
    the whole batch), one optimizer step each; returns the train/* metrics averaged over the steps."""
    cfg = rt.cfg

    def step(idx: list) -> Optional[dict]:
        mb = subset_batch(tb, idx)
        if not any(bool(mb.mask_of(i).any()) for i in range(len(mb))):
            return None  # nothing in the loss (e.g. every row dropped by the estimator's keep mask)
        return rt.actor.train_step(mb, cfg.algo, cfg.rfpo if cfg.rfpo.enabled else None)

    out, steps = minibatch_updates(len(tb), cfg.actor.global_batch_size, cfg.actor.ppo_epochs, step)
    if not steps:
        out = {"train/loss": 0.0, "train/grad_norm": 0.0}
    out["train/optimizer_steps"] = float(steps)
    return out


def minibatch_updates(n: int, size: Optional[int], epochs: int, step) -> tuple[dict[str, float], int]:
    """`epochs` passes over rows 0..n-1 in mini-batches of `size` rows (None: all), calling step(rows) -> metrics
    dict (None: skipped, no optimizer step). Returns (metrics averaged over the steps taken, steps taken)."""
    size = size or n
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(epochs):
        for start in range(0, n, size):
            m = step(list(range(start, min(n, start + size))))
            if m is None:
                continue
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
    return ({k: v / steps for k, v in sums.items()} if steps else {}), steps


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
                      is_fixed=None if tb.is_fixed is None else tb.is_fixed[ix],
                      is_positive=None if tb.is_positive is None else tb.is_positive[ix])


def tis_weights(old_logp, rollout_logp, cap: float, use_tis: bool) -> torch.Tensor:
    """[T] truncated importance weights min(exp(old_logp - rollout_logp), cap) of one row (algos.tis_weight);
    all 1 when `use_tis` is False (fixed samples) or the engine reported no log-probs."""
    from rfpo_megatron.algos.objective import tis_weight

    old = torch.as_tensor(old_logp, dtype=torch.float32)
    if not use_tis or len(rollout_logp) != old.numel():
        return torch.ones_like(old)
    return tis_weight(old.unsqueeze(0), torch.as_tensor(rollout_logp, dtype=torch.float32).unsqueeze(0), cap)[0]


def logprob_pass(actor: Any, seqs: list) -> list:
    """Per-token log-probs of each (prompt ids, response ids) pair under `actor`: list of [T_i] tensors.
    The prompt ids are exactly those given (for a fixed sample: the plain prompt q)."""
    from rfpo_megatron.actor.batch import ActorBatch

    prompts, responses = [list(p) for p, _ in seqs], [list(r) for _, r in seqs]
    logp, _ = actor.compute_logprobs(ActorBatch.from_prompt_response(prompts, responses))
    return logp
