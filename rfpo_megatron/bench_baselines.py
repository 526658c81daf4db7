"""Plain in-process references for the step benchmark (rfpo_megatron.bench_step): what each stage costs
without the project around it, on the same model, prompts and batch.

* `plain_generate`: HF ``model.generate`` of every (prompt, sample) in one left-padded batch — sampling at the
  rollout temperature, no top-k / top-p (HF's default top_k=50 turned off, like the rollout), at most
  ``max_new_tokens``, EOS ends a row — in this process, no HTTP. The target of the rollout stage (issue 18:
  rollout <= 1.1x this).
* `plain_train`: the same HF model's forward + backward + AdamW (+ grad-norm clip 1.0, like the actor) on the
  step's own ActorBatch, split into the actor's micro-batches (right-padded each), GRPO token-mean loss
  ``-mean(A * exp(logp - logp.detach()))`` over response tokens. The target of the train stage (<= 1.3x this).

Both return the median of ``reps`` timed runs after one warm-up; they never touch the trainer's state.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

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
