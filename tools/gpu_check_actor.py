"""Step (c) of the GPU check: the megatron-core actor's bf16 train step and log-prob pass on a random Qwen2.5-shaped model.

`actor_step(model, dry_run, matmul_tflops, record)` builds a random `Actor` (TP = PP = 1, local layer spec,
the project's pad-layout packing by `actor.max_tokens_per_gpu`; on CUDA bf16 with megatron's distributed
optimizer), runs one warm-up and 3 timed (`compute_logprobs`, `train_step`) pairs on one RL-like batch
(random prompt/response lengths, random advantages) and reports tokens/s, peak memory and model FLOP/s as a
fraction of the measured bf16 matmul rate. Model FLOPs (`model_flops`) count the matmuls of the real tokens
(QKV/O, SwiGLU MLP, LM head over every position) and causal attention (QKᵀ and PV over the L(L+1)/2
attended pairs of each sequence); a train step is 3x a forward. It also checks the log-prob pass against an
independent float64 log-softmax of `forward_logits` on two sequences. Dry run: a tiny fp32 model on CPU (gloo).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

BASE = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, vocab_size=151936,
            max_position_embeddings=32768)
MODELS = {  # the public Qwen2.5 architectures (random weights)
    "0.5b": dict(BASE, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(BASE, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "tiny": dict(BASE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=250, max_position_embeddings=256),  # padded to 256
}
# (samples, prompt length range, response length range, actor.max_tokens_per_gpu)
BATCH = {"gpu": (32, (64, 512), (128, 1536), 8192), "dry": (5, (3, 8), (4, 12), 40)}
TEMPERATURE = 0.8
TIMED_STEPS = 3


def model_flops(hf: dict, lengths: list[int], vocab_padded: int) -> float:
    """Forward FLOPs of a batch of sequences with these lengths (see module docstring)."""
    h, layers = hf["hidden_size"], hf["num_hidden_layers"]
    heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = h // heads
    per_token = layers * (2 * h * (heads + 2 * kv) * hd + 2 * heads * hd * h + 2 * 3 * h * hf["intermediate_size"])
    per_token += 2 * h * vocab_padded
    attn_pairs = sum(n * (n + 1) // 2 for n in lengths)
    return float(per_token * sum(lengths) + layers * 2 * 2 * heads * hd * attn_pairs)


def _batch(hf: dict, spec: tuple, seed: int = 0):
    from rfpo_megatron.actor.batch import ActorBatch

    n, (p0, p1), (r0, r1), _ = spec
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(p0, p1 + 1, (n,), generator=g).tolist()
    rlen = torch.randint(r0, r1 + 1, (n,), generator=g).tolist()
    ids = [torch.randint(0, hf["vocab_size"], (p + r,), generator=g) for p, r in zip(plen, rlen)]
    b = ActorBatch(input_ids=ids, prompt_lens=plen)
    b.advantages = [torch.randn(r, generator=g) for r in rlen]
    return b


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()


def logprob_check(actor, hf: dict, length: int) -> float:
    """max |compute_logprobs - float64 log_softmax(forward_logits / T)| on 2 equal-length sequences."""
    from rfpo_megatron.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf["vocab_size"], (2, length), generator=g)
    p = length // 4
    lp, _ = actor.compute_logprobs(ActorBatch(input_ids=[ids[0], ids[1]], prompt_lens=[p, p]))
    logits = actor.forward_logits(ids)  # [2, T, V] fp32 copy of the model's logits
    ref = torch.log_softmax(logits[:, p - 1:-1].double() / TEMPERATURE, -1).gather(2, ids[:, p:, None])[..., 0]
    return float(max((lp[i].double() - ref[i]).abs().max() for i in range(2)))


def actor_step(model: str, dry_run: bool, matmul_tflops: float | None,
               record: Callable[[dict], None] | None = None) -> dict:
    """Build the actor, time warm-up + 3 (compute_logprobs, train_step) pairs; returns the measurements."""
    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.actor.packing import make_microbatches
    from rfpo_megatron.actor.parallel import init_parallel
    from rfpo_megatron.config import ActorConfig, AlgoConfig

    on_gpu = torch.cuda.is_available() and not dry_run
    hf = MODELS[model]
    spec = BATCH["dry" if dry_run else "gpu"]
    t0 = time.perf_counter()
    init_parallel(tp=1, pp=1, seed=1234)
    cfg = ActorConfig(bf16=on_gpu, use_distributed_optimizer=True, max_tokens_per_gpu=spec[3], lr=1e-6,
                      clip_grad=1.0)
    actor = Actor(hf, cfg, total_steps=10, temperature=TEMPERATURE, spec="local")
    n_params = sum(p.numel() for p in actor.modules[0].parameters())
    vpad = int(actor.modules[0].vocab_size)
    out = {"model": model, "hf_config": hf, "params": n_params, "bf16": on_gpu, "layout": actor.layout,
           "distributed_optimizer": actor.use_dist_opt, "build_s": time.perf_counter() - t0}
    batch = _batch(hf, spec)
    lengths = batch.lengths
    groups = make_microbatches(lengths, max_tokens=spec[3], layout=actor.layout)
    padded = sum(len(gr) * max(lengths[i] for i in gr) for gr in groups)
    flops_fwd = model_flops(hf, lengths, vpad)
    out.update(samples=len(lengths), tokens=sum(lengths), response_tokens=sum(batch.response_lens),
               micro_batches=len(groups), pad_efficiency=sum(lengths) / padded, model_tflop_fwd=flops_fwd / 1e12)
    algo = AlgoConfig(policy_loss="ppo", loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28)
    steps = []
    for it in range(1 + TIMED_STEPS):
        if it == 1 and on_gpu:
            torch.cuda.reset_peak_memory_stats()
        _sync(on_gpu)
        a = time.perf_counter()
        batch.old_logp, _ = actor.compute_logprobs(batch)
        _sync(on_gpu)
        b = time.perf_counter()
        metrics = actor.train_step(batch, algo)
        _sync(on_gpu)
        c = time.perf_counter()
        steps.append({"logprobs_s": b - a, "train_step_s": c - b, "loss": metrics["train/loss"],
                      "grad_norm": metrics["train/grad_norm"], "skipped": metrics.get("train/update_skipped", 0.0)})
        if record:
            record(dict(out, steps=steps))
    timed = steps[1:]
    t_train = sorted(s["train_step_s"] for s in timed)[len(timed) // 2]
    t_lp = sorted(s["logprobs_s"] for s in timed)[len(timed) // 2]
    out.update(steps=steps, train_step_s=t_train, logprobs_s=t_lp, train_tokens_per_s=out["tokens"] / t_train,
               logprobs_tokens_per_s=out["tokens"] / t_lp, train_tflops=3 * flops_fwd / t_train / 1e12,
               logprobs_tflops=flops_fwd / t_lp / 1e12, matmul_tflops=matmul_tflops)
    if matmul_tflops:
        out.update(train_mfu=out["train_tflops"] / matmul_tflops, logprobs_mfu=out["logprobs_tflops"] / matmul_tflops)
    if on_gpu:
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    out["logprob_vs_fp64_max_abs_err"] = logprob_check(actor, hf, 12 if dry_run else 256)
    out["finite"] = all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps)
    return out
