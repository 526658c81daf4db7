"""The RFPO fix stage: select wrong responses, prompt the policy to fix them, re-score, place fixes.

Successful fixes are placed into the given groups IN PLACE (placement replace/append).
Engine boundary is a plain callable
    generate(prompts_token_ids: list[list[int]], n: int, sampling: dict)
        -> list (one per prompt) of n tuples (response_ids, logprobs, finish_reason)
so the stage runs without servers. Fixes are scored on the ORIGINAL prompt with the same reward fn;
a fix counts when its CORRECTNESS (the verifier's score before any reward shaping, e.g. DAPO's overlong
penalty) is >= success_threshold; shaping only changes the training reward the placed fix carries. A successful fix becomes a `Sample` whose prompt_ids are
the group's PLAIN prompt ids (never the fix prompt), with fixed_from = the wrong response's ids and
use_tis = False (its rollout log-probs are under the fix prompt).

Multi-turn samples (Sample.loss_mask with environment tokens): the fix works on the FINAL model turn. The fix
prompt is the whole dialogue followed by one more user turn holding the filled template ({response} = the final
turn); a successful fix o_f replaces the final turn only: its prompt_ids are the plain dialogue prefix
q + response_ids[:final_turn_start] (no fix feedback in it) and fixed_from = the wrong final turn, so R_off
compares o and o_f on that same context, as for a single-turn sample on q.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from rfpo_megatron.data.template import PromptFormat, encode_env_turn, encode_prompt
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
                if name == "sampling":  # the run config's fix.temperature / fix.max_new_tokens
                    val = dict(val or {})
                    for k in ("temperature", "max_new_tokens", "top_p"):
                        if get(k, None) is not None:
                            val[k] = get(k, None)
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
    reward: float                       # the training reward (after shaping, if the scorer shapes)
    message: str
    success: bool
    verifier_reward: Optional[float] = None  # correctness: the verifier's score before shaping


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


def _as_output(o: Any) -> tuple[list[int], list[float], str]:
    """Accept a (ids, logprobs, finish_reason) tuple or an engine result with those attributes."""
    if isinstance(o, (tuple, list)):
        ids, logps, finish = o
    else:
        ids, logps, finish = o.output_ids, o.logprobs, o.finish_reason
    return list(ids), list(logps or []), str(finish)


def _split_config(cfg: Any) -> tuple[Any, Optional[PromptFormat]]:
    """The fix section and a prompt format from a full run Config (cfg.rfpo.fix, cfg.data), or cfg itself."""
    rfpo = getattr(cfg, "rfpo", None)
    if rfpo is not None and hasattr(rfpo, "fix"):
        data = getattr(cfg, "data", None)
        chat = getattr(data, "chat_template", True)
        mode = chat if isinstance(chat, str) else ("auto" if chat else "plain")
        return rfpo.fix, PromptFormat(mode=mode)
    return cfg, None


def run_fix_stage(groups: list[RolloutGroup], generate: GenerateFn, reward_fn: Any = None,
                  cfg: Any = None, tokenizer: Any = None, *, sampling: Optional[dict] = None,
                  seed: Optional[int] = None,
                  score: Optional[Callable[[list[Sample]], None]] = None) -> FixStageResult:
    """Run the fix stage over `groups`, placing successful fixes IN PLACE (and returning them).

    generate: `generate(prompts_token_ids, n, sampling) -> [[(ids, logprobs, finish_reason)] * n]`
        (engine result objects with .output_ids/.logprobs/.finish_reason are accepted too).
    reward_fn: a Verifier or callable (see rewards.score_many), scored on the ORIGINAL record.
    score: alternative to reward_fn, `score(samples)` fills `reward`/`reward_message` in place (lets
        the trainer add reward shaping) and returns the verifier's scores before shaping, one per sample
        (success is judged on them); returning None means `reward` is unshaped. One of the two is required.
    cfg: FixStageConfig, dict, the config's `rfpo.fix` section, or the whole run Config (then
        `rfpo.fix` is used and `data.chat_template` picks the prompt format).
    tokenizer: HF tokenizer (encodes the fix prompt through the chat template, decodes responses).
    sampling: rollout sampling dict; fix temperature/max_new_tokens/`cfg.sampling` override it;
        `seed` (if given) is added as sampling["seed"].
    """
    t0 = time.perf_counter()
    fix_cfg, fmt = _split_config(cfg)
    cfg = FixStageConfig.from_any(fix_cfg)
    if cfg.prompt_format is None and fmt is not None:
        cfg.prompt_format = fmt
    if reward_fn is None and score is None:
        raise ValueError("run_fix_stage needs reward_fn or score")
    templates = resolve_templates(cfg.templates)
    variants = cfg.variants
    before = [(list(g.rewards), g.num_fixed, len(g.samples)) for g in groups]
    targets = select_targets(groups, cfg)

    # 1) fix prompts (plain text -> chat template -> ids; a multi-turn sample: its dialogue + one more user turn)
    fix_ids, fix_texts, target_variant, contexts = [], [], [], []
    for k, (gi, si) in enumerate(targets):
        g, s = groups[gi], groups[gi].samples[si]
        variant = variants[k % len(variants)]
        k0 = s.final_turn_start
        resp = s.response_text or _decode(tokenizer, s.response_ids[k0:])
        resp = resp[: cfg.max_response_chars]
        text = render_fix_prompt(templates[variant], g.record or s.record, resp, s.reward_message)
        fix_texts.append(text)
        if k0 == 0:
            fix_ids.append(encode_prompt(tokenizer, text, cfg.prompt_format))
            contexts.append(list(g.prompt_ids))
        else:
            tail = (tokenizer.decode([int(s.response_ids[-1])], skip_special_tokens=False)
                    if s.finish_reason == "stop" else "")
            fix_ids.append(list(s.prompt_ids) + list(s.response_ids)
                           + encode_env_turn(tokenizer, text, cfg.prompt_format, tail))
            contexts.append(list(s.prompt_ids) + list(s.response_ids[:k0]))  # the plain dialogue prefix
        target_variant.append(variant)

    # 2) generate, then score each fix on the ORIGINAL prompt/record
    n = int(cfg.attempts)
    gens: list = []
    if targets:
        samp = dict(sampling or {})
        samp.update(cfg.sampling or {})
        if seed is not None:
            samp["seed"] = int(seed)
        raw = generate(fix_ids, n, samp)
        if len(raw) != len(fix_ids) or any(len(x) != n for x in raw):
            raise RuntimeError(f"fix stage: generate returned {[len(x) for x in raw]} outputs for "
                               f"{len(fix_ids)} prompts x n={n}")
        gens = [[_as_output(o) for o in outs] for outs in raw]
    cands: list[Sample] = []
    for k, ((gi, si), outs) in enumerate(zip(targets, gens)):
        g, orig = groups[gi], groups[gi].samples[si]
        k0 = orig.final_turn_start
        for ids, logps, finish in outs:
            cands.append(Sample(prompt_ids=list(contexts[k]), response_ids=ids, rollout_logprobs=logps,
                                is_fixed=True, fixed_from=list(orig.response_ids[k0:]),
                                fixed_from_logprobs=list(orig.rollout_logprobs[k0:]),
                                fix_variant=target_variant[k], finish_reason=finish, use_tis=False,
                                record=g.record or orig.record, response_text=_decode(tokenizer, ids)))
    correct: list[float] = []  # per candidate: the verifier's score before shaping (success is judged on it)
    if cands:
        if score is not None:
            verdict = score(cands)
            correct = [c.reward for c in cands] if verdict is None else [float(x) for x in verdict]
            if len(correct) != len(cands):
                raise RuntimeError(f"fix stage: score returned {len(correct)} verifier scores for "
                                   f"{len(cands)} fixes")
        else:
            answers = [(c.response_text, str(c.record.get("answer", "")), c.record) for c in cands]
            for c, res in zip(cands, score_many(reward_fn, answers)):
                c.reward, c.reward_message = float(res.reward), res.message
            correct = [c.reward for c in cands]

    # 3) place the first successful attempt of each target
    attempts: list[FixAttempt] = []
    fixed: list[Sample] = []
    tries = {v: 0 for v in variants}
    oks = {v: 0 for v in variants}
    appended: dict[int, list[Sample]] = {}
    for k, (gi, si) in enumerate(targets):
        chosen = None
        for c, corr in zip(cands[k * n:(k + 1) * n], correct[k * n:(k + 1) * n]):
            ok = corr >= cfg.success_threshold
            tries[c.fix_variant] += 1
            oks[c.fix_variant] += int(ok)
            attempts.append(FixAttempt(gi, si, c.fix_variant, fix_texts[k], c.response_text, c.reward,
                                       c.reward_message, ok, corr))
            if ok and chosen is None:
                chosen = c
        if chosen is None:
            continue
        fixed.append(chosen)
        if cfg.placement == "replace":
            groups[gi].samples[si] = chosen
        else:
            appended.setdefault(gi, []).append(chosen)
    for gi, extra in appended.items():
        groups[gi].samples.extend(extra)

    metrics = fix_metrics(before, groups, targets, tries, oks, cfg)
    metrics["perf/fix_time_s"] = time.perf_counter() - t0
    return FixStageResult(list(groups), fixed, attempts, metrics)


def fix_metrics(before: Sequence[tuple[list[float], int, int]], after: Sequence[RolloutGroup],
                targets: Sequence[tuple[int, int]], tries: dict[str, int], oks: dict[str, int],
                cfg: FixStageConfig) -> dict[str, float]:
    """`rfpo/*` fix metrics from the pre-stage snapshot `before` = [(rewards, num_fixed, size)] and
    the groups `after` placement (zero denominators give 0.0)."""
    def frac(a: float, b: float) -> float:
        return float(a) / float(b) if b else 0.0

    n_groups = len(before)
    zero = sum(1 for r, _, _ in before if r and all(is_wrong(x, cfg.threshold) for x in r))
    full = sum(1 for r, _, _ in before if r and not any(is_wrong(x, cfg.threshold) for x in r))
    n_try, n_ok = sum(tries.values()), sum(oks.values())
    new_fixed = [after[gi].num_fixed - before[gi][1] for gi in range(n_groups)]
    n_fixed = sum(g.num_fixed for g in after)
    n_samples = sum(len(g.samples) for g in after)
    m = {
        "rfpo/zero_group_frac": frac(zero, n_groups),
        "rfpo/full_group_frac": frac(full, n_groups),
        "rfpo/fix_groups": float(len({gi for gi, _ in targets})),
        "rfpo/fix_targets": float(len(targets)),
        "rfpo/fix_attempts": float(n_try),
        "rfpo/fix_success_rate": frac(n_ok, n_try),
        "rfpo/fix_target_success_rate": frac(sum(new_fixed), len(targets)),
        "rfpo/fixed_group_frac": frac(sum(1 for x in new_fixed if x > 0), n_groups),
        "rfpo/fixed_seq_frac": frac(n_fixed, n_samples),
    }
    for v in tries:
        m[f"rfpo/fix_success_rate/{v}"] = frac(oks[v], tries[v])
        m[f"rfpo/fix_attempts/{v}"] = float(tries[v])
    return m
