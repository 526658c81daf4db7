"""The actor-side data of a step: StepBatch (the groups flattened), the passes, R_off, advantages, TIS, the Step.

Runs on every rank after the groups were broadcast. N = sequences of the step, F = fixed ones among them,
T = longest response of the N, T0 = longest original wrong response of the F fixed rows.

Data flow (each function RETURNS its result; nothing is written into its arguments):

    build_batch(groups)                       -> StepBatch        token ids, rewards, [N, T] response_mask
                                                                  (False on padding and environment tokens)
    logprob_pass(actor, batch)                -> old [N, T], orig [F, T0]  (ref: originals=False -> [N, T], None)
      or, when old_logp_from_forward(cfg, actor, n) (one optimizer step, nothing reads old before the update):
    fixed_logprob_pass(actor, batch)          -> fixed rows only [N, T] (0 elsewhere), orig [F, T0]; old_logp None
    critic.value_pass(rt, batch)              -> values [N, T] | None
    compute_roff(cfg, batch, old, orig)       -> log_roff [N]
    step_advantages(rt, batch, old, ref, values, m) -> Advantages (advantages, loss_mask, returns)
    make_step(cfg, batch, old, ref, values, log_roff, adv) -> Step   (everything padded once to [N, T])
    critic.update_critic(rt, step), update_policy(rt, step)   mini-batches are Step.rows(a, b) views

Padding: rfpo_megatron.actor.batch.pad_tokens, the package's one padding helper.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch

from rfpo_megatron.actor.batch import ActorBatch, pad_tokens
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
    response_mask: [N, T] bool, True on the first T_i positions of row i (T = longest response) except a multi-turn
                  sample's environment tokens (Sample.loss_mask 0): those never enter any loss.
    fixed_rows: [F] rows of the fixed samples; orig_response_ids: F lists, the original wrong o of each.
    baseline_rewards: [N] the row's group `baseline_reward` (greedy reward, ReMax), or None when a group
    has none.
    routed_experts: N entries, each the sample's rollout MoE routing [P_i + T_i - 1, layers, k] or None
    (Sample.routed_experts); None when no sample has any.
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
    routed_experts: Optional[list] = None

    @property
    def n(self) -> int:
        return len(self.response_ids)


def build_batch(groups: list[RolloutGroup], pad_id: int = 0) -> StepBatch:
    """Flatten groups into a StepBatch (see its docstring for shapes)."""
    prompt_ids, response_ids, rollout_logp, rewards, gidx, fixed, tis = [], [], [], [], [], [], []
    token_masks = []
    fixed_rows, orig = [], []
    routed = []
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
            routed.append(None if s.is_fixed else s.routed_experts)  # a fix's routing ran under the fix prompt
            token_masks.append([True] * len(s.response_ids) if s.loss_mask is None else [bool(x) for x in s.loss_mask])
    base = None
    if groups and all(g.baseline_reward is not None for g in groups):
        base = torch.tensor([float(groups[gi].baseline_reward) for gi in gidx], dtype=torch.float32)
    return StepBatch(prompt_ids, response_ids, rollout_logp, torch.tensor(rewards, dtype=torch.float32),
                     torch.tensor(gidx, dtype=torch.long), torch.tensor(fixed, dtype=torch.bool),
                     torch.tensor(tis, dtype=torch.bool), token_mask(token_masks), fixed_rows,
                     orig, len(groups), base, routed if any(r is not None for r in routed) else None)


def token_mask(rows: list) -> torch.Tensor:
    """[B, max(T_i, 1)] bool from B per-token bool lists [T_i] (False on padding)."""
    T = max([len(r) for r in rows] + [1])
    out = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.bool)
    return out


def length_mask(lens: list) -> torch.Tensor:
    """[B, max(lens, 1)] bool, True on the first lens[i] positions of row i."""
    T = max(list(lens) + [1])
    return torch.arange(T).unsqueeze(0) < torch.tensor(list(lens), dtype=torch.long).reshape(-1, 1)


def sequences_for_logprob(batch: StepBatch, originals: bool = True) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) pairs of the log-prob pass: the N batch rows, then (when `originals`) for
    each fixed row its original wrong response o on the SAME plain prompt q."""
    seqs = list(zip(batch.prompt_ids, batch.response_ids))
    if originals:
        seqs += [(batch.prompt_ids[r], o) for r, o in zip(batch.fixed_rows, batch.orig_response_ids)]
    return seqs


def logprob_pass(actor: Any, batch: StepBatch, originals: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probs under `actor` of the N batch rows -> [N, T] (0 on padding) and, when `originals`, of
    each fixed row's original wrong response on the same plain prompt q -> [F, T0] (else None). One forward
    pass over all N + F sequences; the prompt ids are exactly the batch's (for a fixed sample: q)."""
    seqs = sequences_for_logprob(batch, originals)
    routed = None if batch.routed_experts is None else list(batch.routed_experts) + [None] * (len(seqs) - batch.n)
    logp, _ = actor.compute_logprobs(ActorBatch.from_prompt_response([p for p, _ in seqs], [r for _, r in seqs],
                                                                     routed_experts=routed))
    old = pad_tokens(logp[:batch.n], dtype=torch.float32)
    old = torch.nn.functional.pad(old, (0, batch.response_mask.shape[1] - old.shape[1]))  # T >= 1 like the mask
    return old, (pad_tokens(logp[batch.n:], dtype=torch.float32) if originals else None)


def old_logp_from_forward(cfg: Config, actor: Any, n: int) -> bool:
    """True when the step's old log-probs can be the training forward's own detached log-probs (ratio 1 by
    construction), so the full old-log-prob pass is redundant: `trainer.skip_old_logprob_pass=auto`, ONE
    optimizer step over the whole batch of n rows (actor.ppo_epochs=1, actor.global_batch_size null or >= n:
    the weights of that forward are the ones that produced the batch), and nothing reads old_logp before the
    update: no KL in the reward (old vs ref), no TIS / rollout correction (old vs rollout); and an actor whose
    train_step takes `old_logp_from_forward`. R_off's fixed rows are scored by `fixed_logprob_pass`."""
    import inspect

    a = cfg.algo
    if str(getattr(cfg.trainer, "skip_old_logprob_pass", "auto")) != "auto":
        return False
    if cfg.actor.ppo_epochs != 1 or (cfg.actor.global_batch_size is not None and cfg.actor.global_batch_size < n):
        return False
    from rfpo_megatron.config import correction_modes

    if a.use_kl_in_reward or correction_modes(a):  # TIS / rollout correction read old vs rollout log-probs
        return False
    try:
        return "old_logp_from_forward" in inspect.signature(actor.train_step).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def fixed_logprob_pass(actor: Any, batch: StepBatch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The pre-update log-probs R_off needs when the full pass is skipped: [N, T] with the F fixed rows filled
    (plain prompt q; 0 on every other row) and [F, T0] of their original wrong responses (as logprob_pass).
    One forward over 2F sequences; no forward at all (zeros, None) without fixed rows."""
    T = batch.response_mask.shape[1]
    out = torch.zeros(batch.n, T, dtype=torch.float32)
    if not batch.fixed_rows:
        return out, None
    rows = batch.fixed_rows
    seqs = [(batch.prompt_ids[r], batch.response_ids[r]) for r in rows]
    seqs += [(batch.prompt_ids[r], o) for r, o in zip(rows, batch.orig_response_ids)]
    logp, _ = actor.compute_logprobs(ActorBatch.from_prompt_response([p for p, _ in seqs], [r for _, r in seqs]))
    F = len(rows)
    fixed = pad_tokens(logp[:F], dtype=torch.float32)
    out[torch.tensor(rows, dtype=torch.long), :fixed.shape[1]] = fixed
    return out, pad_tokens(logp[F:], dtype=torch.float32)


def compute_roff(cfg: Config, batch: StepBatch, old_logp: torch.Tensor, orig_logp: Optional[torch.Tensor]) -> torch.Tensor:
    """[N] log R_off per sequence, detached: gamma * (S(o) - S(o_f)) on the fixed rows (clamped to
    +-rfpo.roff_clip), 0 elsewhere. old_logp: [N, T] (rows of the batch, plain prompt); orig_logp: [F, T0]
    (the original wrong o of each fixed row, same plain prompt; from logprob_pass)."""
    from rfpo_megatron.algos.rfpo import compute_log_roff

    log_roff = torch.zeros(batch.n, dtype=torch.float32)
    if not cfg.rfpo.enabled or not batch.fixed_rows:
        return log_roff
    rows = torch.tensor(batch.fixed_rows, dtype=torch.long)
    fixed_mask = length_mask([len(batch.response_ids[r]) for r in batch.fixed_rows])
    fixed_lp = old_logp.detach()[rows, :fixed_mask.shape[1]]
    orig_mask = length_mask([len(o) for o in batch.orig_response_ids])
    lr = compute_log_roff(orig_logp.detach()[:, :orig_mask.shape[1]], orig_mask, fixed_lp, fixed_mask,
                          torch.ones(len(rows), dtype=torch.bool),
                          mode=cfg.rfpo.roff_mode, gamma=cfg.rfpo.gamma, clip=cfg.rfpo.roff_clip)
    log_roff[rows] = lr.float()
    return log_roff.detach()


def kl_controller(cfg: Config):
    """The step-to-step β of the KL in the reward: fixed `algo.kl_in_reward_coef`, or adaptive (PPO/verl) when
    `algo.kl_target` is set (horizon `algo.kl_horizon`). Keep one per run and pass it to `advantages`."""
    from rfpo_megatron.algos.kl import AdaptiveKLController

    a = cfg.algo
    return AdaptiveKLController(a.kl_in_reward_coef, a.kl_target, a.kl_horizon)


@dataclass
class Advantages:
    """What `advantages` returns. advantages: [N, T] float (0 on padding and on rows the estimator drops);
    loss_mask: [N, T] bool, the batch's response_mask AND the estimator's keep mask (reinforce_rej, raft);
    returns: [N, T] GAE returns (algo.adv_estimator=gae; 0 on padding), else None."""

    advantages: torch.Tensor
    loss_mask: torch.Tensor
    returns: Optional[torch.Tensor] = None


def step_advantages(rt: Runtime, batch: StepBatch, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
                    values: Optional[torch.Tensor], metrics: dict) -> Advantages:
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


def advantages(cfg: Config, batch: StepBatch, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
               values: Optional[torch.Tensor] = None, kl_ctrl: Any = None,
               metrics: Optional[dict] = None) -> Advantages:
    """Advantages (see that class) from the registry estimator `algo.adv_estimator`; old_logp, ref_logp,
    values: [N, T] (old_logp None: the pass was skipped, old_logp_from_forward; only KL in reward reads it). Rows dropped by the estimator's keep mask (reinforce_rej, raft) are False in the returned
    loss_mask (`batch` is not changed). gae needs the critic's `values` [N, T] (train.critic.value_pass) and
    returns the GAE returns.

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
    if a.adv_estimator == "gae" and values is None:
        raise ConfigError("algo.adv_estimator=gae needs the critic's values (train.critic.value_pass); "
                          "the trainer builds the critic when algo.adv_estimator=gae")
    mask = batch.response_mask
    old = old_logp.float() if old_logp is not None else None
    kw: dict[str, Any] = {"norm_adv_by_std": a.norm_adv_by_std, "gamma": a.gamma, "lam": a.lam,
                          "old_logp": old, "kl_in_reward_coef": 0.0, "kl_in_reward_type": a.kl_in_reward_type}
    rewards = batch.rewards
    if a.use_kl_in_reward:
        if old is None:
            raise ValueError("algo.use_kl_in_reward=true needs the old log-probs (no old_logp_from_forward)")
        if ref_logp is None:
            raise ConfigError("algo.use_kl_in_reward=true needs the reference model's log-probs (the trainer builds "
                              "the reference actor when use_kl_in_reward is set)")
        ref = ref_logp.float()
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
        kw["values"] = values.float()
    if a.adv_estimator == "remax":  # r_i - reward of the greedy response to the prompt (train.generation.rollout)
        if batch.baseline_rewards is None:
            raise ValueError("algo.adv_estimator=remax: a group has no baseline_reward (greedy response reward); "
                             "the groups must come from train.generation.rollout(..., baseline=True)")
        kw["baseline_rewards"] = batch.baseline_rewards
    adv, returns = compute_advantages(a.adv_estimator, rewards=rewards, group_ids=batch.group_index,
                                      response_mask=mask, **kw)
    keep = sample_keep_mask(a.adv_estimator, batch.rewards, batch.group_index)
    loss_mask = mask & keep.unsqueeze(-1)
    adv = adv.float() * loss_mask
    if cfg.rfpo.enabled and cfg.rfpo.wrong_advantage == "zero" and bool(batch.is_fixed.any()):
        has_fix = torch.zeros(batch.num_groups, dtype=torch.bool).index_fill_(0, batch.group_index[batch.is_fixed], True)
        wrong = (batch.rewards <= cfg.rfpo.fix.threshold) & ~batch.is_fixed & has_fix[batch.group_index]
        adv = torch.where(wrong.unsqueeze(-1), torch.zeros_like(adv), adv)
    return Advantages(adv, loss_mask, returns.float() * mask if a.adv_estimator == "gae" else None)


@dataclass
class Step:
    """One RL step's data after the passes, padded once: what the critic and the policy updates train on.

    batch:       the StepBatch (token ids of the N rows, rewards, group_index, is_fixed, response_mask [N, T]).
    old_logp:    [N, T] float, the actor's log-probs before the update (plain prompt q for fixed rows), or None:
                 the training forward's own detached log-probs are used (old_logp_from_forward).
    ref_logp:    [N, T] float reference log-probs (KL loss / KL in reward), or None.
    values:      [N, T] float critic values (algo.adv_estimator=gae), or None.
    log_roff:    [N] float log R_off (0 on unfixed rows; all 0 with rfpo.enabled=false), detached.
    advantages:  [N, T] float (0 on padding and dropped rows).
    loss_mask:   [N, T] bool, tokens in the loss (response_mask AND the estimator's keep mask AND the rollout
                 correction's keep mask).
    returns:     [N, T] float GAE returns (gae), or None.
    tis_weights: [N, T] float rollout-correction weights (algo.rollout_correction / algo.tis_cap; exactly 1 on
                 fixed rows), or None.
    correction_metrics: the rollout correction's train/* metrics of the whole step.
    is_positive: [N] bool, reward >= rfpo.fix.success_threshold (VAPO positive NLL).

    `rows(a, b)` is the mini-batch of rows a..b-1: every tensor sliced (views), nothing copied.
    """

    batch: StepBatch
    old_logp: Optional[torch.Tensor]
    log_roff: torch.Tensor
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    is_positive: torch.Tensor
    ref_logp: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None
    tis_weights: Optional[torch.Tensor] = None
    correction_metrics: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.batch.n

    def rows(self, start: int, stop: int) -> "Step":
        """Rows start..stop-1 (a mini-batch): views of every tensor."""
        if (start, stop) == (0, self.n):
            return self
        b = self.batch
        sl = slice(start, stop)
        fixed = [r - start for r in b.fixed_rows if start <= r < stop]
        sub = replace(b, prompt_ids=b.prompt_ids[sl], response_ids=b.response_ids[sl], rollout_logp=b.rollout_logp[sl],
                      rewards=b.rewards[sl], group_index=b.group_index[sl], is_fixed=b.is_fixed[sl],
                      use_tis=b.use_tis[sl], response_mask=b.response_mask[sl], fixed_rows=fixed,
                      orig_response_ids=[o for r, o in zip(b.fixed_rows, b.orig_response_ids) if start <= r < stop],
                      baseline_rewards=None if b.baseline_rewards is None else b.baseline_rewards[sl],
                      routed_experts=None if b.routed_experts is None else b.routed_experts[sl])

        def cut(t):
            return None if t is None else t[sl]

        return Step(sub, cut(self.old_logp), self.log_roff[sl], self.advantages[sl], self.loss_mask[sl],
                    self.is_positive[sl], cut(self.ref_logp), cut(self.values), cut(self.returns), cut(self.tis_weights),
                    self.correction_metrics)

    def actor_batch(self, with_roff: bool = True, with_rollout_logp: bool = False) -> ActorBatch:
        """The actor's ActorBatch of these rows: per-row fields are views [:T_i] of the [N, T] tensors.
        with_rollout_logp: also the engine's log-probs (rfpo.offpolicy_shaping=guide; NaN rows = none reported)."""
        b = self.batch
        lens = [len(r) for r in b.response_ids]

        def per_row(t):
            return None if t is None else [t[i, :L] for i, L in enumerate(lens)]

        return ActorBatch.from_prompt_response(
            b.prompt_ids, b.response_ids, advantages=per_row(self.advantages), old_logp=per_row(self.old_logp),
            ref_logp=per_row(self.ref_logp), tis_weights=per_row(self.tis_weights),
            response_mask=per_row(self.loss_mask), log_roff=self.log_roff if with_roff else None,
            is_fixed=b.is_fixed, is_positive=self.is_positive, routed_experts=b.routed_experts,
            rollout_logp=None if not with_rollout_logp else [
                torch.tensor(x, dtype=torch.float32) if len(x) == L else torch.full((L,), float("nan"))
                for x, L in zip(b.rollout_logp, lens)])


def make_step(cfg: Config, batch: StepBatch, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
              values: Optional[torch.Tensor], log_roff: torch.Tensor, adv: Advantages) -> Step:
    """Assemble the Step (adds the rollout-correction weights and mask, and the positive flags)."""
    w, keep, met = rollout_correction(cfg, batch, old_logp)
    return Step(batch, old_logp, log_roff, adv.advantages, adv.loss_mask & keep,
                batch.rewards >= cfg.rfpo.fix.success_threshold, ref_logp=ref_logp, values=values,
                returns=adv.returns, tis_weights=w, correction_metrics=met)


def rollout_correction(cfg: Config, batch: StepBatch, old_logp: torch.Tensor
                       ) -> tuple[Optional[torch.Tensor], torch.Tensor, dict[str, float]]:
    """The chain algo.rollout_correction (or [tis] from algo.tis_cap alone) on ρ = exp(old - rollout), see
    algos/correction.py: (weights [N, T] or None, keep [N, T] bool, train/* metrics). It never acts on fixed rows
    (their rollout log-probs were under the fix prompt), rows whose engine reported no log-probs, or tokens off
    the response mask (environment tokens): weight 1, kept."""
    from rfpo_megatron.algos.correction import apply_rollout_correction
    from rfpo_megatron.config import correction_modes

    modes = correction_modes(cfg.algo)
    if not modes:
        return None, torch.ones_like(batch.response_mask), {}
    lens = [len(r) for r in batch.response_ids]
    has = torch.tensor([len(r) == L for r, L in zip(batch.rollout_logp, lens)], dtype=torch.bool)
    rollout = pad_tokens([r if ok else [] for r, ok in zip(batch.rollout_logp, has.tolist())], dtype=torch.float64)
    T = old_logp.shape[1]
    rollout = torch.nn.functional.pad(rollout, (0, T - rollout.shape[1]))
    eligible = batch.response_mask[:, :T] & (batch.use_tis & has).unsqueeze(-1)
    rc = cfg.algo.rollout_correction
    knobs = {k: getattr(rc, k) for k in ("icepop_low", "icepop_high", "seq_mask_low", "seq_mask_high", "seq_is_cap",
                                         "reject_kl_type", "token_reject_threshold", "seq_reject_threshold")}
    w, keep, met = apply_rollout_correction(modes, old_logp, rollout, eligible, tis_cap=cfg.algo.tis_cap, **knobs)
    out = {"train/" + k if k.startswith("rollout_logprob_gap") else "train/rollout_correction/" + k: v
           for k, v in met.items()}
    return w, keep, out


def tis_weights(cfg: Config, batch: StepBatch, old_logp: torch.Tensor) -> Optional[torch.Tensor]:
    """[N, T] rollout-correction weights of the step (rollout_correction; with algo.tis_cap alone
    min(exp(old - rollout), tis_cap)), or None; exactly 1 on fixed rows and rows without engine log-probs."""
    return rollout_correction(cfg, batch, old_logp)[0]


def update_policy(rt: Runtime, step: Step) -> dict[str, float]:
    """actor.ppo_epochs passes over the step in mini-batches of actor.global_batch_size sequences (None:
    the whole batch), one optimizer step each; returns the train/* metrics averaged over the steps.
    step.old_logp None (old_logp_from_forward): the one optimizer step uses its forward's own log-probs."""
    cfg = rt.cfg
    kw = {}
    if step.old_logp is None:
        if cfg.actor.ppo_epochs != 1 or (cfg.actor.global_batch_size or step.n) < step.n:
            raise ValueError("step.old_logp is None but the update takes more than one optimizer step")
        kw["old_logp_from_forward"] = True

    def update(mb: Step) -> Optional[dict]:
        if not bool(mb.loss_mask.any()):
            return None  # nothing in the loss (e.g. every row dropped by the estimator's keep mask)
        guide = cfg.rfpo.enabled and cfg.rfpo.offpolicy_shaping == "guide"
        return rt.actor.train_step(mb.actor_batch(with_roff=cfg.rfpo.enabled, with_rollout_logp=guide), cfg.algo,
                                   cfg.rfpo if cfg.rfpo.enabled else None, **kw)

    out, steps = minibatch_updates(step, cfg.actor.global_batch_size, cfg.actor.ppo_epochs, update)
    if not steps:
        out = {"train/loss": 0.0, "train/grad_norm": 0.0}
    out["train/optimizer_steps"] = float(steps)
    return out


def minibatch_updates(step: Step, size: Optional[int], epochs: int,
                      update: Callable[[Step], Optional[dict]]) -> tuple[dict[str, float], int]:
    """`epochs` passes over the step's rows in mini-batches (Step.rows views) of `size` rows (None: all),
    calling update(mini-batch) -> metrics dict (None: skipped, no optimizer step). Returns (metrics averaged
    over the steps taken, steps taken)."""
    n = step.n
    size = size or n
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(epochs):
        for start in range(0, n, size):
            m = update(step.rows(start, min(n, start + size)))
            if m is None:
                continue
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
    return ({k: v / steps for k, v in sums.items()} if steps else {}), steps
