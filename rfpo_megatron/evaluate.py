"""`rfpo-megatron eval`: avg@k and pass@k of a checkpoint (or the HF start weights) on held-out prompt sets.

    rfpo-megatron eval CONFIG.yaml [key=value ...] [--checkpoint DIR] [--files a.jsonl,b.jsonl] [--k K] [--out FILE]

For each prompt k responses are sampled at rollout.temperature (no fix prompt, plain prompt only) and
scored by data.reward_fn; a response is correct when its reward >= rfpo.fix.success_threshold.
avg@k = mean correctness over all n·k responses; pass@k = share of prompts with at least one correct
response (the unbiased estimator 1 - C(n-c, k)/C(n, k) with n = k samples). Metrics: eval/<set>/avg@k,
eval/<set>/pass@k (set = file stem). The metric code is rfpo_megatron.train.evaluation (shared with the
trainer's periodic eval); its names are re-exported here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

from rfpo_megatron.train.evaluation import evaluate_sets, pass_at_k, score_set  # noqa: F401 (re-exported)


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
    return 0


def evaluate_checkpoint(cfg: Any, checkpoint: Optional[str], k: Optional[int] = None, seed: int = 0) -> dict:
    """Evaluate the HF start weights (checkpoint=None) or a trainer checkpoint on cfg.data.eval_files."""
    from transformers import AutoTokenizer

    from rfpo_megatron import train as T
    from rfpo_megatron.data.dataset import load_kwargs, load_prompt_sets
    from rfpo_megatron.data.template import PromptFormat
    from rfpo_megatron.rewards import build_reward

    if not cfg.actor.hf_model_path or not os.path.isfile(os.path.join(cfg.actor.hf_model_path, "config.json")):
        raise FileNotFoundError(f"actor.hf_model_path='{cfg.actor.hf_model_path}' has no config.json")
    tok = AutoTokenizer.from_pretrained(cfg.actor.hf_model_path)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    fmt = PromptFormat(mode="auto" if cfg.data.chat_template else "plain")
    kw = load_kwargs(cfg.data)
    sets = {os.path.splitext(os.path.basename(p))[0]: load_prompt_sets([p], **kw).records
            for p in cfg.data.eval_files}
    rt = T.Runtime(cfg)
    try:
        rt.engine = T.launch_rollout_engine(cfg)
        rt.cleanup.append(rt.engine.shutdown)
        if checkpoint:
            ckpt = checkpoint
            if not os.path.isfile(os.path.join(ckpt, T.STATE_FILE)):
                ckpt = T.latest_trainer_checkpoint(checkpoint)
                if ckpt is None:
                    raise FileNotFoundError(f"--checkpoint {checkpoint}: no {T.STATE_FILE} and no 'latest' file")
            from rfpo_megatron.actor.parallel import init_parallel
            from rfpo_megatron.train.lifecycle import lone_process_port

            lone_process_port()  # two evals at a time must not share torch's default port
            init_parallel(cfg.actor.tensor_model_parallel_size, cfg.actor.pipeline_model_parallel_size,
                          seed=cfg.trainer.seed, vpp=cfg.actor.virtual_pipeline_model_parallel_size,
                         ep=cfg.actor.expert_model_parallel_size, etp=cfg.actor.expert_tensor_parallel_size)
            from rfpo_megatron.actor.checkpoint import load_actor_state as load_actor

            rt.actor = T.build_actor(cfg, with_optimizer=False)
            load_actor(rt.actor, os.path.join(ckpt, "actor"), load_optimizer=False, load_rng=False)
            T.sync_weights(rt)
        verifier = build_reward(cfg.data)
        if hasattr(verifier, "close"):
            rt.cleanup.append(verifier.close)
        return evaluate_sets(rt.engine, tok, verifier, sets, cfg, seed=seed, eos_ids=eos, prompt_format=fmt, k=k)
    finally:
        T.teardown(rt)
