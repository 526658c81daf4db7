"""Step metrics computed from rollout groups: `rollout/*` (before the fix stage) and `rfpo/*` (after it).

Inputs are `RolloutGroup`s (rfpo_megatron.data.types); `log_roff` is a [N] tensor over the batch's
sequences (0 for unfixed ones). Definitions follow docs/algorithms.md (RFPO, Metrics).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch


def prompt_key(record: dict[str, Any], prompt_text: str = "") -> str:
    """Stable identity of a prompt: the record's `id`, else its prompt text."""
    rid = record.get("id") if record else None
    if rid not in (None, ""):
        return str(rid)
    return str((record or {}).get("prompt", prompt_text))


def rollout_metrics(groups: Sequence[Any], success_threshold: float = 1.0) -> dict[str, float]:
    """`rollout/*` of the policy's own samples (call before the fix stage changes the groups).

    reward_mean/std over all samples; accuracy = share of samples with reward >= success_threshold;
    solve_rate = share of groups with at least one such sample; response_len_mean/max in tokens;
    truncation_rate = share of samples that stopped at the length limit.
    """
    rewards = [s.reward for g in groups for s in g.samples]
    lens = [len(s.response_ids) for g in groups for s in g.samples]
    n = max(1, len(rewards))
    mean = sum(rewards) / n
    var = sum((r - mean) ** 2 for r in rewards) / n
    return {
        "rollout/reward_mean": mean,
        "rollout/reward_std": var ** 0.5,
        "rollout/accuracy": sum(r >= success_threshold for r in rewards) / n,
        "rollout/solve_rate": sum(any(s.reward >= success_threshold for s in g.samples) for g in groups)
        / max(1, len(groups)),
        "rollout/response_len_mean": sum(lens) / n,
        "rollout/response_len_max": float(max(lens) if lens else 0),
        "rollout/truncation_rate": sum(s.finish_reason == "length" for g in groups for s in g.samples) / n,
        "rollout/num_samples": float(len(rewards)),
        "rollout/num_prompts": float(len(groups)),
        **turn_metrics([s for g in groups for s in g.samples]),
    }


def turn_metrics(samples: Sequence[Any]) -> dict[str, float]:
    """Multi-turn samples (a `loss_mask` with environment tokens, rollout.generate_fn): rollout/turns_mean (model
    turns per sample) and rollout/env_token_frac (environment tokens / response tokens); {} when none has a mask."""
    masks = [list(s.loss_mask) for s in samples if getattr(s, "loss_mask", None) is not None]
    if not masks:
        return {}
    turns = [sum(1 for i, x in enumerate(m) if x and (i == 0 or not m[i - 1])) for m in masks]
    total = sum(len(m) for m in masks)
    return {"rollout/turns_mean": sum(turns) / len(turns),
            "rollout/env_token_frac": sum(1 for m in masks for x in m if not x) / max(1, total)}


def group_flags(groups: Sequence[Any], threshold: float = 0.0, success_threshold: float = 1.0) -> dict[str, float]:
    """zero_group_frac (every reward <= threshold) and full_group_frac (every reward >= success_threshold)."""
    n = max(1, len(groups))
    zero = sum(all(r <= threshold for r in g.rewards) for g in groups)
    full = sum(all(r >= success_threshold for r in g.rewards) for g in groups)
    return {"rfpo/zero_group_frac": zero / n, "rfpo/full_group_frac": full / n}


ROFF_HIST_BINS = 8


def roff_metrics(log_roff: torch.Tensor, is_fixed: torch.Tensor, clip: float) -> dict[str, float]:
    """R_off statistics over fixed sequences. log_roff: [N] (clamped), is_fixed: [N] bool.

    roff_clamped_frac = share of fixed sequences whose |log R_off| reached the clip bound.
    rfpo/log_roff_hist_{i}, i < ROFF_HIST_BINS: how many fixed sequences have log R_off in the i-th of
    ROFF_HIST_BINS equal bins over [-clip, clip] (both ends included: clamped values land in the end bins);
    summed over steps they are the run's R_off histogram (examples/tiny_cpu/compare.py).
    With no fixed sequence the stats are R_off = 1, clamped 0 and empty bins.
    """
    fixed = is_fixed.bool()
    n = int(fixed.sum())
    out = {"rfpo/fixed_seq_frac": n / max(1, int(is_fixed.numel()))}
    lr = log_roff.detach().double()[fixed]
    counts = torch.histc(lr.clamp(-clip, clip), bins=ROFF_HIST_BINS, min=-clip, max=clip) if n else \
        torch.zeros(ROFF_HIST_BINS, dtype=torch.float64)
    out.update({f"rfpo/log_roff_hist_{i}": float(c) for i, c in enumerate(counts)})
    if n == 0:
        out.update({"rfpo/roff_mean": 1.0, "rfpo/roff_min": 1.0, "rfpo/roff_max": 1.0,
                    "rfpo/log_roff_mean": 0.0, "rfpo/roff_clamped_frac": 0.0})
        return out
    r = lr.exp()
    out.update({
        "rfpo/roff_mean": float(r.mean()),
        "rfpo/roff_min": float(r.min()),
        "rfpo/roff_max": float(r.max()),
        "rfpo/log_roff_mean": float(lr.mean()),
        "rfpo/roff_clamped_frac": float((lr.abs() >= clip - 1e-9).double().mean()),
    })
    return out


def grad_signal_frac(advantages: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> float:
    """Share of groups with at least one sequence of nonzero advantage. advantages: [N] (per sequence),
    group_index: [N] int (group of each sequence)."""
    if num_groups == 0:
        return 0.0
    nz = torch.zeros(num_groups, dtype=torch.bool)
    nz.index_put_((group_index.long(),), advantages.detach().abs() > 0, accumulate=True)
    return float(nz.double().mean())


@dataclass
class InternalizationTracker:
    """Tracks prompts that were all-wrong at some step and whether they are later solved without a fix.

    internalization_rate = |prompts needing a fix earlier and solved later by the policy's own samples|
                           / |prompts that needed a fix|   (0 when none needed one).
    State is plain lists (saved in the trainer checkpoint).
    """

    needed: dict[str, int] = field(default_factory=dict)  # prompt key -> first step it was all-wrong
    solved_later: dict[str, int] = field(default_factory=dict)  # prompt key -> step it was solved

    def update(self, step: int, groups: Iterable[Any], threshold: float = 0.0,
               success_threshold: float = 1.0) -> None:
        """Call with the groups BEFORE the fix stage (the policy's own samples)."""
        for g in groups:
            key = prompt_key(g.record, g.prompt_text)
            rewards = [s.reward for s in g.samples if not s.is_fixed]
            if rewards and all(r <= threshold for r in rewards):
                self.needed.setdefault(key, step)
            elif key in self.needed and self.needed[key] < step and any(r >= success_threshold for r in rewards):
                self.solved_later.setdefault(key, step)

    @property
    def rate(self) -> float:
        return len(self.solved_later) / len(self.needed) if self.needed else 0.0

    def metrics(self) -> dict[str, float]:
        return {"rfpo/internalization_rate": self.rate, "rfpo/prompts_needing_fix": float(len(self.needed))}

    def state_dict(self) -> dict[str, Any]:
        return {"needed": dict(self.needed), "solved_later": dict(self.solved_later)}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        state = state or {}
        self.needed = {str(k): int(v) for k, v in state.get("needed", {}).items()}
        self.solved_later = {str(k): int(v) for k, v in state.get("solved_later", {}).items()}
