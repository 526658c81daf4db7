"""Evaluation: avg@k and pass@k of the policy on held-out prompt sets (every K steps and `rfpo-megatron eval`).

    rfpo-megatron eval CONFIG.yaml [key=value ...] [--checkpoint DIR] [--files a.jsonl,b.jsonl] [--k K] [--out FILE]

For each prompt k responses are sampled at rollout.temperature (no fix prompt, plain prompt only) and
scored by data.reward_fn; a response is correct when its reward >= rfpo.fix.success_threshold.
avg@k = mean correctness over all n·k responses; pass@k = share of prompts with at least one correct
response (the unbiased estimator 1 - C(n-c, k)/C(n, k) with n = k samples). Metrics: eval/<set>/avg@k,
eval/<set>/pass@k (set = file stem).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Optional


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n samples, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_set(correct: list[list[bool]], k: int) -> dict[str, float]:
    """correct: per prompt, n >= k booleans. Returns {"avg@k", "pass@k"} (avg over the first k samples)."""
    if not correct:
        return {f"avg@{k}": 0.0, f"pass@{k}": 0.0}
    avg = sum(sum(c[:k]) / k for c in correct) / len(correct)
    pk = sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(correct)
    return {f"avg@{k}": avg, f"pass@{k}": pk}


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


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rfpo-megatron eval", description=__doc__.splitlines()[0])
    p.add_argument("config", help="the run's YAML config (model, data, rollout sections)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--checkpoint", default=None,
                   help="a trainer checkpoint (save_dir/step_N or save_dir: its latest); default: the HF weights")
    p.add_argument("--files", default=None, help="comma-separated jsonl/parquet sets (default: data.eval_files)")
    p.add_argument("--k", type=int, default=None, help="samples per prompt (default: trainer.eval_n_samples)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: trainer.seed)")
    p.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    return p.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Standalone eval: start the engine from actor.hf_model_path, load the checkpoint's weights into it
    (through the actor and the weight sync), evaluate, print JSON."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from rfpo_megatron import train as T
    from rfpo_megatron.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        files = [f for f in (args.files.split(",") if args.files else cfg.data.eval_files) if f]
        if not files:
            raise ConfigError("no eval sets: pass --files a.jsonl,b.jsonl or set data.eval_files")
        cfg.data.eval_files = files
        metrics = evaluate_checkpoint(cfg, args.checkpoint, k=args.k,
                                      seed=cfg.trainer.seed if args.seed is None else args.seed)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"rfpo-megatron eval: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    del T
    return 0


def evaluate_checkpoint(cfg: Any, checkpoint: Optional[str], k: Optional[int] = None, seed: int = 0) -> dict:
    """Evaluate the HF start weights (checkpoint=None) or a trainer checkpoint on cfg.data.eval_files."""
    from transformers import AutoTokenizer

    from rfpo_megatron import train as T
    from rfpo_megatron.data.dataset import load_prompt_sets
    from rfpo_megatron.data.template import PromptFormat
    from rfpo_megatron.rewards import get_reward_fn

    if not cfg.actor.hf_model_path or not os.path.isfile(os.path.join(cfg.actor.hf_model_path, "config.json")):
        raise FileNotFoundError(f"actor.hf_model_path='{cfg.actor.hf_model_path}' has no config.json")
    tok = AutoTokenizer.from_pretrained(cfg.actor.hf_model_path)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    fmt = PromptFormat(mode="auto" if cfg.data.chat_template else "plain")
    kw = dict(skip_bad_records=cfg.data.skip_bad_records, prompt_key=cfg.data.prompt_key,
              answer_key=cfg.data.answer_key)
    sets = {os.path.splitext(os.path.basename(p))[0]: load_prompt_sets([p], **kw).records
            for p in cfg.data.eval_files}
    rt = T.Runtime(cfg)
    try:
        rt.engine = T.launch_rollout_engine(cfg)
        rt.cleanup.append(rt.engine.shutdown)
        if checkpoint:
            ckpt = checkpoint
            if not os.path.isfile(os.path.join(ckpt, T.STATE_FILE)):
                ckpt = T.latest_checkpoint(checkpoint)
                if ckpt is None:
                    raise FileNotFoundError(f"--checkpoint {checkpoint}: no {T.STATE_FILE} and no 'latest' file")
            from rfpo_megatron.actor.parallel import init_parallel

            init_parallel(cfg.actor.tensor_model_parallel_size, cfg.actor.pipeline_model_parallel_size,
                          seed=cfg.trainer.seed)
            from rfpo_megatron.actor.checkpoint import load_checkpoint as load_actor

            rt.actor = T.build_actor(cfg, with_optimizer=False)
            load_actor(rt.actor, os.path.join(ckpt, "actor"), load_optimizer=False, load_rng=False)
            T.sync_weights(rt)
        return evaluate_sets(rt.engine, tok, get_reward_fn(cfg.data.reward_fn), sets, cfg, seed=seed,
                             eos_ids=eos, prompt_format=fmt, k=k)
    finally:
        T.teardown(rt)
