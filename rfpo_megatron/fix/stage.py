"""The RFPO fix stage: select wrong responses, prompt the policy to fix them, re-score, place fixes.

Engine boundary is a plain callable
    generate(prompts_token_ids: list[list[int]], n: int, sampling: dict)
        -> list (one per prompt) of n tuples (response_ids, logprobs, finish_reason)
so the stage runs without servers. Fixes are scored on the ORIGINAL prompt with the same reward fn;
a fix counts at reward >= success_threshold. A successful fix becomes a `Sample` whose prompt_ids are
the group's PLAIN prompt ids (never the fix prompt), with fixed_from = the wrong response's ids and
use_tis = False (its rollout log-probs are under the fix prompt).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from rfpo_megatron.data.template import PromptFormat, encode_prompt
from rfpo_megatron.data.types import RolloutGroup, Sample
from rfpo_megatron.fix.templates import VARIANTS, render_fix_prompt, resolve_templates
from rfpo_megatron.rewards.base import score_many

GenerateFn = Callable[[list[list[int]], int, dict], list[list[tuple[list[int], list[float], str]]]]


@dataclass
class FixStageConfig:
    """Fix-stage knobs (mirrors `rfpo.fix` of the run config; see docs/fix_stage.md)."""

    variant: Any = "reference"          # a variant name or a list (cycled over targets)
    trigger: str = "all_wrong"          # all_wrong | any_wrong
    threshold: float = 0.0              # a response is wrong when reward <= threshold
    success_threshold: float = 1.0      # a fix counts when reward >= success_threshold
    attempts: int = 1                   # fix generations per wrong response
    max_per_group: int = 1              # wrong responses fixed per group (<= 0: all)
    placement: str = "replace"          # replace | append
    templates: dict = field(default_factory=dict)  # variant -> template override
    sampling: dict = field(default_factory=dict)   # generation overrides for fixes
    max_response_chars: int = 4000      # the wrong response shown in the fix prompt is cut to this
    prompt_format: Optional[PromptFormat] = None

    @property
    def variants(self) -> list[str]:
        v = self.variant
        return [v] if isinstance(v, str) else list(v)

    @classmethod
    def from_any(cls, cfg: Any) -> "FixStageConfig":
        """From a FixStageConfig, a dict, or any object with (a subset of) these attribute names."""
        if isinstance(cfg, cls):
            out = cfg
        else:
            get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
            kw = {}
            for name in cls.__dataclass_fields__:
                val = get(name, None)
                if val is None and name == "variant":
                    val = get("variants", None)
                if val is not None:
                    kw[name] = dict(val) if name in ("templates", "sampling") else val
            if not isinstance(kw.get("prompt_format", PromptFormat()), PromptFormat):
                kw["prompt_format"] = PromptFormat.from_any(kw["prompt_format"])
            if "variant" in kw and not isinstance(kw["variant"], str):
                kw["variant"] = list(kw["variant"])
            out = cls(**kw)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise a one-line error naming the bad `rfpo.fix.*` field."""
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"rfpo.fix.variant='{v}' is unknown; use one of {', '.join(VARIANTS)}")
        if not self.variants:
            raise ValueError("rfpo.fix.variant is empty; name at least one variant")
        if self.trigger not in ("all_wrong", "any_wrong"):
            raise ValueError(f"rfpo.fix.trigger='{self.trigger}' is unknown; use all_wrong or any_wrong")
        if self.placement not in ("replace", "append"):
            raise ValueError(f"rfpo.fix.placement='{self.placement}' is unknown; use replace or append")
        if int(self.attempts) < 1:
            raise ValueError(f"rfpo.fix.attempts={self.attempts} must be >= 1")
        resolve_templates(self.templates)


@dataclass
class FixAttempt:
    """One fix generation (for logging/debugging; the fix prompt lives here, never on a Sample)."""

    group_index: int
    sample_index: int
    variant: str
    fix_prompt_text: str
    response_text: str
    reward: float
    message: str
    success: bool


@dataclass
class FixStageResult:
    """Groups after placement, the fixed samples, every attempt, and `rfpo/*` metrics."""

    groups: list[RolloutGroup]
    fixed_samples: list[Sample]
    attempts: list[FixAttempt]
    metrics: dict[str, float]


def is_wrong(reward: float, threshold: float) -> bool:
    """A response needs fixing when its reward is <= threshold."""
    return reward <= threshold


def select_targets(groups: Sequence[RolloutGroup], cfg: FixStageConfig) -> list[tuple[int, int]]:
    """(group_index, sample_index) pairs to fix, per trigger, at most max_per_group per group."""
    out = []
    for gi, g in enumerate(groups):
        wrong = [si for si, s in enumerate(g.samples) if is_wrong(s.reward, cfg.threshold) and not s.is_fixed]
        if not wrong:
            continue
        if cfg.trigger == "all_wrong" and len(wrong) != len(g.samples):
            continue
        if cfg.max_per_group > 0:
            wrong = wrong[: cfg.max_per_group]
        out.extend((gi, si) for si in wrong)
    return out


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def run_fix_stage(groups: Sequence[RolloutGroup], generate: GenerateFn, reward_fn: Any, cfg: Any,
                  tokenizer: Any, sampling: Optional[dict] = None) -> FixStageResult:
    """Run the fix stage over `groups` (not modified; the result holds modified copies).

    generate: the engine callable (see module doc). reward_fn: a Verifier or callable (score_many).
    cfg: FixStageConfig / dict / config object. tokenizer: HF tokenizer (encode fix prompts, decode).
    sampling: the rollout's sampling dict; `cfg.sampling` entries override it for fixes.
    """
    t0 = time.perf_counter()
    cfg = FixStageConfig.from_any(cfg)
    templates = resolve_templates(cfg.templates)
    variants = cfg.variants
    out_groups = [copy.copy(g) for g in groups]
    for g in out_groups:
        g.samples = list(g.samples)
    targets = select_targets(out_groups, cfg)

    # 1) fix prompts
    fix_ids, fix_texts, target_variant = [], [], []
    for k, (gi, si) in enumerate(targets):
        g, s = out_groups[gi], out_groups[gi].samples[si]
        variant = variants[k % len(variants)]
        resp = s.response_text or _decode(tokenizer, s.response_ids)
        resp = resp[: cfg.max_response_chars]
        text = render_fix_prompt(templates[variant], g.record or s.record, resp, s.reward_message)
        fix_texts.append(text)
        fix_ids.append(encode_prompt(tokenizer, text, cfg.prompt_format))
        target_variant.append(variant)

    # 2) generate and score on the ORIGINAL prompt
    n = int(cfg.attempts)
    gens: list = []
    if targets:
        samp = dict(sampling or {})
        samp.update(cfg.sampling or {})
        gens = generate(fix_ids, n, samp)
        if len(gens) != len(fix_ids) or any(len(x) != n for x in gens):
            raise RuntimeError(f"fix stage: generate returned {[len(x) for x in gens]} outputs for "
                               f"{len(fix_ids)} prompts x n={n}")
    items, texts = [], []
    for (gi, si), outs in zip(targets, gens):
        rec = out_groups[gi].record or out_groups[gi].samples[si].record
        for ids, _, _ in outs:
            texts.append(_decode(tokenizer, ids))
            items.append((texts[-1], str(rec.get("answer", "")), rec))
    scores = score_many(reward_fn, items) if items else []

    # 3) place the first successful attempt of each target
    attempts: list[FixAttempt] = []
    fixed: list[Sample] = []
    per_var_tries = {v: 0 for v in variants}
    per_var_ok = {v: 0 for v in variants}
    appended: dict[int, list[Sample]] = {}
    j = 0
    for k, ((gi, si), outs) in enumerate(zip(targets, gens)):
        g, orig, variant = out_groups[gi], out_groups[gi].samples[si], target_variant[k]
        chosen = None
        for ids, logps, finish in outs:
            res, text = scores[j], texts[j]
            j += 1
            ok = res.reward >= cfg.success_threshold
            per_var_tries[variant] += 1
            per_var_ok[variant] += int(ok)
            attempts.append(FixAttempt(gi, si, variant, fix_texts[k], text, res.reward, res.message, ok))
            if ok and chosen is None:
                chosen = Sample(prompt_ids=list(g.prompt_ids), response_ids=list(ids),
                                rollout_logprobs=list(logps), reward=float(res.reward),
                                reward_message=res.message, is_fixed=True,
                                fixed_from=list(orig.response_ids),
                                fixed_from_logprobs=list(orig.rollout_logprobs), fix_variant=variant,
                                finish_reason=finish, use_tis=False, record=orig.record or g.record,
                                response_text=text)
        if chosen is None:
            continue
        fixed.append(chosen)
        if cfg.placement == "replace":
            g.samples[si] = chosen
        else:
            appended.setdefault(gi, []).append(chosen)
    for gi, extra in appended.items():
        out_groups[gi].samples.extend(extra)

    metrics = fix_metrics(groups, out_groups, targets, per_var_tries, per_var_ok, cfg)
    metrics["perf/fix_time_s"] = time.perf_counter() - t0
    return FixStageResult(out_groups, fixed, attempts, metrics)


def fix_metrics(before: Sequence[RolloutGroup], after: Sequence[RolloutGroup],
                targets: Sequence[tuple[int, int]], tries: dict[str, int], oks: dict[str, int],
                cfg: FixStageConfig) -> dict[str, float]:
    """`rfpo/*` fix metrics (zero denominators give 0.0)."""
    def frac(a: float, b: float) -> float:
        return float(a) / float(b) if b else 0.0

    n_groups = len(before)
    zero = sum(1 for g in before if g.samples and all(is_wrong(r, cfg.threshold) for r in g.rewards))
    full = sum(1 for g in before if g.samples and not any(is_wrong(r, cfg.threshold) for r in g.rewards))
    n_try, n_ok = sum(tries.values()), sum(oks.values())
    n_fixed = sum(g.num_fixed for g in after)
    n_samples = sum(len(g.samples) for g in after)
    targeted_groups = {gi for gi, _ in targets}
    fixed_groups = sum(1 for gi in targeted_groups if after[gi].num_fixed > before[gi].num_fixed)
    m = {
        "rfpo/zero_group_frac": frac(zero, n_groups),
        "rfpo/full_group_frac": frac(full, n_groups),
        "rfpo/fix_groups": float(len(targeted_groups)),
        "rfpo/fix_targets": float(len(targets)),
        "rfpo/fix_attempts": float(n_try),
        "rfpo/fix_success_rate": frac(n_ok, n_try),
        "rfpo/fix_target_success_rate": frac(n_fixed - sum(g.num_fixed for g in before), len(targets)),
        "rfpo/fixed_group_frac": frac(fixed_groups, n_groups),
        "rfpo/fixed_seq_frac": frac(n_fixed, n_samples),
    }
    for v in tries:
        m[f"rfpo/fix_success_rate/{v}"] = frac(oks[v], tries[v])
        m[f"rfpo/fix_attempts/{v}"] = float(tries[v])
    return m
