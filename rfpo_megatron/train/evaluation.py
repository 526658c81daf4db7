"""avg@k and pass@k of the engine's current weights on held-out prompt sets: used by the trainer's periodic eval
(train.generation.run_eval) and by `rfpo-megatron eval` (rfpo_megatron.evaluate, the CLI above the trainer).

For each prompt k responses are sampled at rollout.temperature (plain prompt, never a fix prompt) and scored by
data.reward_fn; a response is correct when its reward >= rfpo.fix.success_threshold. avg@k = mean correctness
over all n·k responses; pass@k = share of prompts with at least one correct response (the unbiased estimator
1 - C(n-c, k)/C(n, k) with n = k samples). Metrics: eval/<set>/avg@k, eval/<set>/pass@k (set = file stem), and
the pass@k curve from the same samples, eval/<set>/pass@j for every power of two j < k (the capability boundary:
`rfpo-megatron eval --k 64` gives pass@1 ... pass@64).
"""
from __future__ import annotations

import math
from typing import Any, Optional


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n samples, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_set(correct: list[list[bool]], k: int) -> dict[str, float]:
    """correct: per prompt, n >= k booleans. Returns {"avg@k", "pass@k"} (avg over the first k samples) and
    pass@j for every power of two j < k (unbiased, from all n samples of each prompt)."""
    ks = sorted({k, *(1 << i for i in range(k.bit_length()) if (1 << i) < k)})
    if not correct:
        return {f"avg@{k}": 0.0, **{f"pass@{j}": 0.0 for j in ks}}
    out = {f"avg@{k}": sum(sum(c[:k]) / k for c in correct) / len(correct)}
    for j in ks:
        out[f"pass@{j}"] = sum(pass_at_k(len(c), sum(c), j) for c in correct) / len(correct)
    return out


def evaluate_sets(engine: Any, tokenizer: Any, verifier: Any, sets: dict[str, list[dict]], cfg: Any,
                  seed: int, eos_ids: list[int], prompt_format: Any = None,
                  k: Optional[int] = None) -> dict[str, float]:
    """eval/<name>/avg@k and pass@k for each prompt set (name -> records) with `engine`'s current weights."""
    from rfpo_megatron.data.batching import build_prompts
    from rfpo_megatron.rewards import score_many
    from rfpo_megatron.rollout.base import SamplingParams

    k = int(k or cfg.trainer.eval_n_samples)
    r = cfg.rollout
    thr = cfg.rfpo.fix.success_threshold
    out: dict[str, float] = {}
    for si, (name, records) in enumerate(sorted(sets.items())):
        items = build_prompts(records, tokenizer, prompt_format, cfg.data.max_prompt_len)
        params = SamplingParams(n=k, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                max_new_tokens=r.max_new_tokens, stop_token_ids=list(eos_ids), seed=seed + 101 * si)
        results = engine.generate([it.prompt_ids for it in items], params)
        flat = [(tokenizer.decode(res.output_ids, skip_special_tokens=True),
                 str(it.record.get(cfg.data.answer_key, "")), it.record)
                for it, per in zip(items, results) for res in per]
        rewards = [x.reward for x in score_many(verifier, flat)]
        correct = [[rw >= thr for rw in rewards[i * k:(i + 1) * k]] for i in range(len(items))]
        for key, v in score_set(correct, k).items():
            out[f"eval/{name}/{key}"] = v
        lens = [len(res.output_ids) for per in results for res in per]
        out[f"eval/{name}/response_len_mean"] = sum(lens) / max(1, len(lens))
    return out
