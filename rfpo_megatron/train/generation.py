"""Rank-0 generation stages of a step: rollout, reward scoring, the fix-stage adapter, dynamic sampling, eval.

All of them talk to the rollout engine (`rt.engine.generate`) and the verifier, and count generations and
generated tokens in `rt.counters` (the rollout budget). They run on rank 0 only.
"""
from __future__ import annotations

from typing import Optional

import torch

from rfpo_megatron.config import Config
from rfpo_megatron.data.types import RolloutGroup, Sample
from rfpo_megatron.train.runtime import SEED_EVAL, SEED_REFILL, Runtime, step_seed, timed


def sampling_params(cfg: Config, n: int, seed: Optional[int], eos_ids: list, temperature=None,
                    max_new_tokens=None):
    from rfpo_megatron.rollout.base import SamplingParams

    r = cfg.rollout
    return SamplingParams(n=n, temperature=r.temperature if temperature is None else temperature,
                          top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens if max_new_tokens is None else max_new_tokens,
                          stop_token_ids=list(eos_ids), seed=seed)


def rollout(rt: Runtime, records: list, seed: int, n: Optional[int] = None,
            temperature: Optional[float] = None, baseline: Optional[bool] = None) -> list[RolloutGroup]:
    """Generate `n` (default rollout.n_samples) responses per record and score them -> one group each.

    With rollout.generate_fn set, that function makes the groups (custom_rollout; e.g. multi-turn dialogues whose
    environment tokens carry loss_mask 0); they are scored here like the default rollout's.

    `baseline` (None: when algo.adv_estimator=remax): also generate ONE greedy (temperature 0) response per
    prompt, score it and store its reward as `group.baseline_reward` (the ReMax baseline; counted in the
    rollout budget, not a sample of the group)."""
    from rfpo_megatron.data.batching import build_prompts

    cfg = rt.cfg
    if baseline is None:
        baseline = cfg.algo.adv_estimator == "remax"
    params = sampling_params(cfg, n or cfg.rollout.n_samples, seed, rt.eos_ids, temperature=temperature)
    if cfg.rollout.generate_fn is not None:
        groups = custom_rollout(rt, records, params)
    else:
        items = build_prompts(records, rt.tokenizer, rt.prompt_format, cfg.data.max_prompt_len)
        results = rt.engine.generate([it.prompt_ids for it in items], params)
        groups = []
        for it, res in zip(items, results):
            samples = [Sample(prompt_ids=list(it.prompt_ids), response_ids=list(r.output_ids),
                              rollout_logprobs=list(r.logprobs), finish_reason=r.finish_reason, record=it.record,
                              routed_experts=r.routed_experts,
                              response_text=rt.tokenizer.decode(r.output_ids, skip_special_tokens=True),
                              **sample_versions(r))
                       for r in res]
            groups.append(RolloutGroup(prompt_ids=list(it.prompt_ids), samples=samples, record=it.record,
                                       prompt_text=it.prompt_text))
    score_samples(rt, [s for g in groups for s in g.samples])
    rt.counters["generations"] = rt.counters.get("generations", 0) + sum(len(g.samples) for g in groups)
    rt.counters["generated_tokens"] = rt.counters.get("generated_tokens", 0) + sum(  # the model's tokens only
        len(s.response_ids) if s.loss_mask is None else sum(map(bool, s.loss_mask)) for g in groups for s in g.samples)
    if baseline:
        greedy = rollout(rt, [g.record for g in groups], seed, n=1, temperature=0.0, baseline=False)
        for g, b in zip(groups, greedy):
            g.baseline_reward = float(b.samples[0].reward)
    return groups


def sample_versions(res) -> dict:
    """Sample.weight_version / token_versions of one GenerateResult: the oldest version among its tokens, and the
    per-token versions when a weight sync split it into segments (rollout.partial; else None)."""
    from rfpo_megatron.rollout.partial import token_versions, version_of

    if int(res.meta.get("segments", 1)) <= 1:
        return {"weight_version": version_of(res.meta)}
    versions = token_versions(res)
    return {"weight_version": min(versions) if versions else version_of(res.meta), "token_versions": versions}


def custom_rollout(rt: Runtime, records: list, params) -> list[RolloutGroup]:
    """The groups of rollout.generate_fn (loaded once into rt.generate_fn; train.custom_rollout), unscored."""
    from rfpo_megatron.train.custom_rollout import RolloutContext, load_generate_fn, run_generate_fn

    cfg = rt.cfg
    spec = cfg.rollout.generate_fn
    if rt.generate_fn is None:
        rt.generate_fn = load_generate_fn(spec)
    ctx = RolloutContext(tokenizer=rt.tokenizer, prompt_format=rt.prompt_format, max_prompt_len=cfg.data.max_prompt_len,
                         verifier=rt.verifier, answer_key=cfg.data.answer_key,
                         success_threshold=cfg.rfpo.fix.success_threshold, kwargs=dict(cfg.rollout.generate_kwargs))
    return run_generate_fn(rt.generate_fn, spec, rt.engine, records, params, ctx)


def baseline_metrics(groups: list[RolloutGroup]) -> dict[str, float]:
    """rollout/remax_baseline_reward_mean: mean greedy-response reward over the groups ({} without baselines)."""
    base = [g.baseline_reward for g in groups if g.baseline_reward is not None]
    return {"rollout/remax_baseline_reward_mean": sum(base) / len(base)} if base else {}


def score_samples(rt: Runtime, samples: list[Sample]) -> list[float]:
    """Fill `reward` and `reward_message` of each sample (verifier on the decoded text; DAPO overlong
    shaping added when algo.overlong_buffer_len > 0) and return the verifier's scores BEFORE shaping, one
    per sample: correctness, which the fix stage judges fix success on (shaping is for the training
    reward only; a correct fix that is long is still a correct fix)."""
    from rfpo_megatron.rewards import score_many

    answer_key = rt.cfg.data.answer_key
    results = score_many(rt.verifier, [(s.response_text, str(s.record.get(answer_key, "")), s.record)
                                       for s in samples])
    a = rt.cfg.algo
    for s, res in zip(samples, results):
        s.reward, s.reward_message = float(res.reward), res.message
    correct = [float(res.reward) for res in results]
    if a.overlong_buffer_len > 0 and samples:
        from rfpo_megatron.algos.shaping import overlong_penalty

        pen = overlong_penalty(torch.tensor([len(s.response_ids) for s in samples], dtype=torch.long),
                               max_response_len=a.max_response_len, overlong_buffer_len=a.overlong_buffer_len,
                               overlong_penalty_factor=a.overlong_penalty_factor)  # [N]
        for s, p in zip(samples, pen.tolist()):
            s.reward += float(p)
    return correct


def fix_stage(rt: Runtime, groups: list[RolloutGroup], seed: int) -> tuple[list[RolloutGroup], dict]:
    """RFPO fix stage on rank 0 (rfpo_megatron.fix.run_fix_stage): places the successful fixes into
    `groups` and returns (groups, rfpo/* metrics). Fix generations are counted for the rollout budget.
    A fix succeeds on its verifier score (before overlong shaping); a placed fix carries the shaped
    training reward like every other sample."""
    from rfpo_megatron.fix import run_fix_stage

    cfg = rt.cfg
    gen_count, gen_tokens, versions = [0], [0], []

    def generate(prompt_ids: list, n: int, sampling: dict) -> list:
        params = sampling_params(cfg, n, sampling.get("seed", seed), rt.eos_ids,
                                 temperature=sampling.get("temperature"),
                                 max_new_tokens=sampling.get("max_new_tokens"))
        out = rt.engine.generate(prompt_ids, params)
        versions.extend(sample_versions(r)["weight_version"] for o in out for r in o)
        gen_count[0] += sum(len(o) for o in out)
        gen_tokens[0] += sum(len(r.output_ids) for o in out for r in o)
        return out

    res = run_fix_stage(groups, generate, cfg=cfg, tokenizer=rt.tokenizer, seed=seed,
                        sampling={"temperature": cfg.rollout.temperature,
                                  "max_new_tokens": cfg.rollout.max_new_tokens},
                        score=lambda samples: score_samples(rt, samples))
    for g in res.groups:  # a placed fix carries the oldest weight version of the stage's generations
        for s in g.samples:
            if s.is_fixed and versions:
                s.weight_version = min(versions)
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


def run_eval(rt: Runtime, step: int) -> dict[str, float]:
    """eval/<set>/avg@k and pass@k on data.eval_files with the engine's current weights (rank 0)."""
    if not rt.is_rank0 or not rt.eval_sets:
        return {}
    from rfpo_megatron.train.evaluation import evaluate_sets

    m: dict[str, float] = {}
    with timed(m, "perf/eval_time"):
        m.update(evaluate_sets(rt.engine, rt.tokenizer, rt.verifier, rt.eval_sets, rt.cfg,
                               seed=step_seed(rt.cfg, step, SEED_EVAL), eos_ids=rt.eos_ids,
                               prompt_format=rt.prompt_format))
    return m
