"""Plain in-process references for the step benchmark (rfpo_megatron.bench_step): what each stage costs
without the project around it, on the same model, prompts and batch.

* `plain_generate`: HF ``model.generate`` of every (prompt, sample) in one left-padded batch — sampling at the
  rollout temperature, no top-k / top-p (HF's default top_k=50 turned off, like the rollout), at most
  ``max_new_tokens``, EOS ends a row — in this process, no HTTP. The target of the rollout stage (issue 18:
  rollout <= 1.1x this).
* `plain_train`: the same HF model's forward + backward + AdamW (+ grad-norm clip 1.0, like the actor) on the
  step's own ActorBatch, split into the actor's micro-batches (right-padded each), GRPO token-mean loss
  ``-mean(A * exp(logp - logp.detach()))`` over response tokens. The target of the train stage (<= 1.3x this).

* `trl_step`: TRL's ``GRPOTrainer`` on the same model, prompts, reward and shape (8 prompts x 8 samples, beta 0,
  one optimizer step per generation batch), precision and recompute matched to the actor (fp32: ``bf16=False``;
  ``gradient_checkpointing=False``; TRL's defaults are bf16 autocast and checkpointing), constant lr.

All return the median of timed runs after warm-up. ``python -m rfpo_megatron.bench_baselines`` runs them in a
process of their own (bench_step calls it so: the trainer's process has megatron's CPU redirect active).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

import torch


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")


def plain_generate(model_dir: str, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                   reps: int = 3) -> dict[str, float]:
    """HF generate of `prompts` (one row each, already repeated per sample) -> {"time": median s, "tokens": new
    tokens of the last run (rows stop at EOS)}."""
    model = _load(model_dir).eval()
    cfg = model.config
    eos = model.generation_config.eos_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos if isinstance(eos, int) else (eos or [0])[0])
    B, T = len(prompts), max(map(len, prompts))
    ids = torch.full((B, T), int(pad), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    last: dict[str, Any] = {}

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=int(pad))
        new = out[:, T:]
        stop = torch.zeros_like(new, dtype=torch.bool)
        for e in ([] if eos is None else [eos] if isinstance(eos, int) else eos):
            stop |= new == int(e)
        after = stop.cumsum(-1) - stop.long() > 0  # positions after a row's first EOS (HF fills them with pad)
        last["tokens"] = int((~after).sum())  # generated tokens, the EOS included (as the rollout counts them)
    t = _median_time(run, reps)
    return {"time": t, "tokens": float(last["tokens"])}


def plain_train(model_dir: str, batch: Any, micro_batch_size: int, lr: float, reps: int = 3) -> dict[str, float]:
    """HF forward+backward+AdamW of the ActorBatch `batch` (input_ids, prompt_lens, advantages), micro-batches of
    `micro_batch_size` rows in batch order -> {"time": median s per optimizer step, "micro_batches": count}."""
    model = _load(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rows = list(range(len(batch.input_ids)))
    chunks = [rows[s:s + micro_batch_size] for s in range(0, len(rows), micro_batch_size)]
    n_tok = float(sum(len(x) - p for x, p in zip(batch.input_ids, batch.prompt_lens)))
    prepared = []
    for chunk in chunks:  # built once: the timed part is the model work only
        L = max(len(batch.input_ids[i]) for i in chunk)
        ids = torch.zeros((len(chunk), L), dtype=torch.long)
        att = torch.zeros((len(chunk), L), dtype=torch.long)
        adv = torch.zeros((len(chunk), L - 1))
        resp = torch.zeros((len(chunk), L - 1), dtype=torch.bool)
        for k, i in enumerate(chunk):
            x, p = batch.input_ids[i], batch.prompt_lens[i]
            ids[k, :len(x)], att[k, :len(x)] = x, 1
            resp[k, p - 1:len(x) - 1] = True  # position t predicts token t + 1
            adv[k, p - 1:len(x) - 1] = batch.advantages[i].float()
        prepared.append((ids, att, adv, resp))

    def step():
        opt.zero_grad(set_to_none=True)
        for ids, att, adv, resp in prepared:
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            loss = -(adv * torch.exp(logp - logp.detach()))[resp].sum() / n_tok
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {"time": _median_time(step, reps), "micro_batches": float(len(chunks))}


def trl_step(model_dir: str, train_file: str, prompts: int, samples: int, max_new_tokens: int, lr: float,
             warmup: int, steps: int, work_dir: str) -> Optional[float]:
    """Median s/step of TRL's GRPOTrainer over `steps` steps after `warmup`; None when TRL is not installed."""
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL comparison: skipped — `import trl` failed (optional: make bench-trl builds .venv-trl with TRL)")
        return None
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rfpo_megatron.rewards.registry import get_reward_fn

    with open(train_file) as fh:
        recs = [json.loads(line) for line in fh]
    tok = AutoTokenizer.from_pretrained(model_dir)
    verifier = get_reward_fn("arithmetic")
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": str(r["answer"])}
                            for r in recs])

    def reward(completions, answer, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [float(verifier.score(t, a, {}).reward) for t, a in zip(texts, answer)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            times.append(time.perf_counter() - self.t0)

    conf = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_trl_", dir=work_dir), use_cpu=True,
                      per_device_train_batch_size=prompts * samples, num_generations=samples,
                      max_completion_length=max_new_tokens, beta=0.0, learning_rate=lr, lr_scheduler_type="constant",
                      bf16=False, gradient_checkpointing=False, max_steps=warmup + steps, logging_steps=1,
                      report_to=[], save_strategy="no", disable_tqdm=True)
    GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), reward_funcs=reward,
                args=conf, train_dataset=ds, processing_class=tok, callbacks=[Clock()]).train()
    print(f"TRL GRPOTrainer steps (s): {[round(t, 4) for t in times]}")
    return statistics.median(times[warmup:]) if len(times) > warmup else None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rfpo_megatron.bench_baselines", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--batch", required=True, help="torch.save'd {input_ids, prompt_lens, advantages} of one step")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--micro-batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-plain", dest="plain", action="store_false", help="skip plain generate / train")
    p.add_argument("--trl", action="store_true")
    p.add_argument("--train-file")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work-dir", default=tempfile.gettempdir())
    p.add_argument("--json", required=True, help="write the results here")
    a = p.parse_args(argv)
    from types import SimpleNamespace

    b = SimpleNamespace(**torch.load(a.batch))
    out: dict[str, float] = {}
    if a.plain:
        prompts = [x[:n].tolist() for x, n in zip(b.input_ids, b.prompt_lens)]
        g = plain_generate(a.model, prompts, a.max_new_tokens, reps=a.reps)
        t = plain_train(a.model, b, a.micro_batch_size, a.lr, reps=a.reps)
        print(f"plain HF generate (same {len(prompts)} prompts, in-process): {g['time']:.4f} s, {g['tokens']:.0f} new "
              f"tokens; plain PyTorch fwd+bwd+AdamW (same batch, {t['micro_batches']:.0f} micro-batches): "
              f"{t['time']:.4f} s", flush=True)
        out.update(generate=g["time"], generate_tokens=g["tokens"], train=t["time"], train_micro_batches=t["micro_batches"])
    if a.trl:
        s = trl_step(a.model, a.train_file, a.prompts, a.samples, a.max_new_tokens, a.lr, a.warmup, a.steps, a.work_dir)
        if s is not None:
            out["trl_step"] = s
    with open(a.json, "w") as fh:
        json.dump(out, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
