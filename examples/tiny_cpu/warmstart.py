"""Warm start for the tiny CPU example: SFT on easy addition (plus fix-format examples), HF-generate
rollouts, and the measurements (easy/hard accuracy, fix success per variant).

Everything here is plain torch/transformers on CPU; `prepare.py` drives it.
"""
from __future__ import annotations

import math
import random
import time
from typing import Any, Callable, Sequence

import torch

from rfpo_megatron.data.template import encode_prompt
from rfpo_megatron.data.types import RolloutGroup, Sample
from rfpo_megatron.fix import run_fix_stage
from rfpo_megatron.fix.templates import render_fix_prompt, resolve_templates
from rfpo_megatron.rewards.addition import addition_steps


# ------------------------------------------------------------------------------------------ SFT data

def corrupt_solution(rec: dict, rng: random.Random) -> str:
    """A plausible wrong attempt at `rec` (for fix-format SFT examples): carries ignored (what a model
    that never saw a carry writes), a dropped last column, one column sum off by one, or an
    off-by-one/ten answer. Always wrong."""
    a, b = int(rec["a"]), int(rec["b"])
    steps = addition_steps(a, b)
    kind = rng.randrange(4)
    if kind == 0 and any(int(s.split("=")[1]) >= 10 for s in steps):  # ignore carries
        cols = [(int(s[0]), int(s[2])) for s in steps]
        sums = [(x + y) % 10 if rng.random() < 0.5 else min(x + y, 9) for x, y in cols]
        out = [f"{x}+{y}+0={s}" for (x, y), s in zip(cols, sums)]
        return " ".join(out + [f"ans={int(''.join(str(s) for s in sums[::-1]))}"])
    if kind == 1 and len(steps) > 1:  # stop one column early (the typical length-generalisation error)
        return " ".join(steps[:-1] + [f"ans={(a + b) % 10 ** (len(steps) - 1)}"])
    if kind <= 2:  # one column sum off by one, answer follows it
        i = rng.randrange(len(steps))
        lhs, s = steps[i].split("=")
        wrong = int(s) + rng.choice([-1, 1]) if int(s) > 0 else int(s) + 1
        steps[i] = f"{lhs}={wrong}"
        total = a + b + (wrong - int(s)) * 10 ** i
        return " ".join(steps + [f"ans={total}"])
    return " ".join(steps + [f"ans={a + b + rng.choice([-10, -1, 1, 10])}"])


def sft_examples(records: Sequence[dict], tokenizer: Any, templates: dict, fix_frac: float,
                 variants: Sequence[str], seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) pairs: each record as a plain example, plus `fix_frac` of them as
    fix-format examples (wrong attempt + feedback -> correct solution) across `variants`."""
    from rfpo_megatron.rewards.addition import AdditionVerifier

    rng, ver, out = random.Random(seed), AdditionVerifier(), []
    tpl = resolve_templates(templates)
    eos = tokenizer.eos_token
    for rec in records:
        target = tokenizer(rec["solution"] + eos, add_special_tokens=False)["input_ids"]
        out.append((encode_prompt(tokenizer, rec["prompt"]), target))
        if rng.random() < fix_frac:
            wrong = corrupt_solution(rec, rng)
            err = ver.score(wrong, rec["answer"], rec).message
            text = render_fix_prompt(tpl[rng.choice(list(variants))], rec, wrong, err)
            out.append((encode_prompt(tokenizer, text), target))
    return out


class GatedSchedule:
    """Warm-up, then a constant lr until `start_decay()` is called (the model has learned the task), then a
    cosine decay to 0 over `decay` steps. The hold is capped: if `start_decay()` has not been called `hold`
    steps into a phase (or by `max_steps - decay`), the decay starts there anyway and the phase's gate stays
    unmet. `reheat(factor)` starts a new phase: warm-up to `factor` x the last phase's lr, hold, decay again.
    Call `step()` once per optimizer step.

    Why: the tiny model learns the task in a sudden jump (the SFT loss falls from ≈ 0.25 to ≈ 0.01 when it
    learns to copy digits from the prompt) whose step depends on the seed, the thread count and the math
    kernels; a cosine over a fixed step count can decay the lr before a late jump and leave a half-trained
    model. Holding the lr until the jump has happened makes every run decay from the same place; a reheat at
    a lower lr finishes a run whose decayed model still misses the final check (`train_sft`).
    """

    def __init__(self, opt, lr: float, max_steps: int, decay: int = 500, warmup: int = 100,
                 hold: int | None = None):
        self.opt, self.lr, self.max_steps, self.decay, self.warmup = opt, lr, max_steps, decay, warmup
        self.hold = hold
        self.t, self.phase_start, self.decay_from, self.gated_at = 0, 0, None, None
        self._set(lr * min(1.0, 1 / warmup))

    def _set(self, lr: float) -> None:
        for grp in self.opt.param_groups:
            grp["lr"] = lr

    @property
    def done(self) -> bool:
        return self.decay_from is not None and self.t >= self.decay_from + self.decay

    def start_decay(self, gated: bool = True) -> None:
        if self.decay_from is None:
            self.decay_from = self.t
            if gated and self.gated_at is None:
                self.gated_at = self.t

    def reheat(self, factor: float) -> None:
        """A new phase at `factor` x the current phase's lr. Its warm-up starts with the next `step()`: the
        optimizer step right after the call still runs at the decayed lr 0 (it only updates AdamW's moments)."""
        self.lr *= factor
        self.phase_start, self.decay_from = self.t, None

    def step(self) -> None:
        self.t += 1
        if self.decay_from is None and self.t >= self.max_steps - self.decay:
            self.decay_from = self.t
        if self.decay_from is None:
            self._set(self.lr * min(1.0, (self.t - self.phase_start + 1) / self.warmup))
        else:
            self._set(self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (self.t - self.decay_from) / self.decay))))


def train_sft(model, examples: list, steps: int, batch_size: int = 32, lr: float = 3e-3,
              seed: int = 0, log: Callable[[str], None] = print, log_every: int = 100,
              probe: Callable[[Any], float] | None = None, gate: float = 0.0, probe_every: int = 200,
              decay: int = 500, hold: int | None = None,
              final_check: Callable[[Any], tuple[bool, dict]] | None = None, reheat: float = 1 / 3) -> dict:
    """Next-token SFT on response tokens only (AdamW).

    gate = 0: warm-up + cosine over `steps` (the old recipe). gate > 0: `GatedSchedule` — constant lr until
    `probe(model)` (a greedy accuracy, run every `probe_every` steps in eval mode, RNG state restored) is
    >= gate or `hold` steps have passed, then `decay` cosine steps; `steps` is the cap. After a decay,
    `final_check(model)` -> (ok, numbers) (eval mode, RNG restored); if not ok and at least
    `probe_every + decay` steps remain, the schedule reheats at `reheat` x the lr and goes on.
    Returns {"losses": [per step], "gated_at": step or None, "probes": [(step, accuracy)],
    "checks": [(step, ok, numbers)], "reheats": int}.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    gated = GatedSchedule(opt, lr, steps, decay=min(decay, steps // 2), hold=hold) if gate > 0 else None
    if gated is None:
        warm = max(1, steps // 20)
        cos = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))

    def in_eval(fn):
        rng = torch.get_rng_state()
        model.eval()
        out = fn(model)
        model.train()
        torch.set_rng_state(rng)
        return out

    model.train()
    losses, probes, checks, reheats, t0 = [], [], [], 0, time.time()
    # length buckets (less padding): sort by length, 8 batches per bucket; a step samples one bucket
    # with probability proportional to its size, then a batch inside it (~uniform over examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    buckets = [order[i:i + 8 * batch_size] for i in range(0, len(order), 8 * batch_size)]
    weights = torch.tensor([len(b) for b in buckets], dtype=torch.float)
    for step in range(steps):
        bucket = buckets[int(torch.multinomial(weights, 1, generator=g))]
        idx = [bucket[j] for j in torch.randint(len(bucket), (batch_size,), generator=g).tolist()]
        seqs = [examples[i][0] + examples[i][1] for i in idx]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(batch_size, T, dtype=torch.long)
        labels = torch.full((batch_size, T), -100, dtype=torch.long)
        att = torch.zeros(batch_size, T, dtype=torch.long)
        for r, i in enumerate(idx):
            p, o = examples[i]
            ids[r, :len(p) + len(o)] = torch.tensor(p + o)
            labels[r, len(p):len(p) + len(o)] = torch.tensor(o)
            att[r, :len(p) + len(o)] = 1
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if gated is None:
            cos.step()
        else:
            gated.step()
            if gated.decay_from is None and (step + 1) % probe_every == 0:
                acc = in_eval(probe)
                probes.append((step + 1, acc))
                log(f"  sft step {step + 1}: probe accuracy {acc:.3f} (gate {gate})")
                if acc >= gate:
                    gated.start_decay()
                    log(f"  sft step {step + 1}: gate met; cosine decay over {gated.decay} steps")
            if gated.decay_from is None and hold is not None and step + 1 - gated.phase_start >= hold:
                gated.start_decay(gated=False)
                log(f"  sft step {step + 1}: WARNING gate NOT met in {hold} steps; decaying anyway")
            elif gated.decay_from == step + 1 and step + 1 >= steps - gated.decay:
                log(f"  sft step {step + 1}: WARNING gate not met (or not probed) by the step cap; decaying anyway")
        end = gated is not None and gated.done
        if end and final_check is not None:
            ok, nums = in_eval(final_check)
            checks.append((step + 1, ok, nums))
            log(f"  sft step {step + 1}: final check {'passed' if ok else 'FAILED'} {nums}")
            if not ok and steps - (step + 1) >= probe_every + gated.decay:
                gated.reheat(reheat)
                reheats, end = reheats + 1, False
                log(f"  sft step {step + 1}: reheat at lr {gated.lr:.2e} (hold, gate, decay again)")
        if (step + 1) % log_every == 0 or step == steps - 1 or end:
            log(f"  sft step {step + 1}/{steps}  loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}"
                f"  lr {opt.param_groups[0]['lr']:.2e}  ({time.time() - t0:.0f}s)")
        if end:
            break
    model.eval()
    return {"losses": losses, "gated_at": gated.gated_at if gated else None, "probes": probes, "checks": checks,
            "reheats": reheats}


def sft_with_restarts(make_model: Callable[[int], Any], init_seed: int, restarts: int,
                      log: Callable[[str], None] = print, **train_kw) -> tuple[Any, dict, list[dict]]:
    """`train_sft(make_model(seed), seed=seed, **train_kw)`; when the run ends with its final check failing
    (no room left under the step cap), start again from `make_model(seed + 1000)`, at most `restarts` times.
    Each attempt is exactly the run a fresh process would make with that init seed (the model and the batch
    order follow it; data and probes do not). Returns (model, the last attempt's result, per attempt
    {"init_seed", "steps", "checks"})."""
    attempts = []
    for k in range(restarts + 1):
        seed = init_seed + 1000 * k
        model = make_model(seed)
        res = train_sft(model, seed=seed, log=log, **train_kw)
        attempts.append({"init_seed": seed, "steps": len(res["losses"]), "checks": res["checks"]})
        if not res["checks"] or res["checks"][-1][1]:
            break
        why = f"the final check still fails with no room left under the step cap ({res['checks'][-1][2]})"
        if k < restarts:
            log(f"WARNING {why}; restarting from a fresh init (init seed {seed + 1000})")
        else:
            log(f"WARNING {why} and no restart is left: the warm start will likely fall outside the band")
    return model, res, attempts


# ------------------------------------------------------------------------------ HF generate callable

def hf_generate_fn(model, tokenizer, max_new_tokens: int = 64, batch_size: int = 64):
    """The fix-stage/rollout engine boundary on HF `generate`:
    generate(prompts_token_ids, n, sampling) -> per prompt, n (ids incl. EOS, logprobs [T], finish_reason).
    sampling keys: temperature (0 = greedy), max_new_tokens, seed."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    @torch.no_grad()
    def generate(prompts: list[list[int]], n: int, sampling: dict) -> list[list[tuple]]:
        temp = float(sampling.get("temperature", 1.0))
        mnt = int(sampling.get("max_new_tokens") or max_new_tokens)
        if sampling.get("seed") is not None:
            torch.manual_seed(int(sampling["seed"]))
        flat = [p for p in prompts for _ in range(n)]
        outs: list[tuple] = []
        for c in range(0, len(flat), batch_size):
            chunk = flat[c:c + batch_size]
            L = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            att = torch.zeros((len(chunk), L), dtype=torch.long)
            for r, p in enumerate(chunk):
                ids[r, L - len(p):] = torch.tensor(p)
                att[r, L - len(p):] = 1
            kw = dict(do_sample=True, temperature=temp, top_k=0, top_p=1.0) if temp > 0 else dict(do_sample=False)
            res = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=mnt, eos_token_id=eos,
                                 pad_token_id=pad, output_scores=True, return_dict_in_generate=True, **kw)
            new = res.sequences[:, L:]
            lp = torch.stack([torch.log_softmax(s.float(), -1) for s in res.scores], 1)  # [B, T, V]
            tok_lp = lp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for r in range(new.shape[0]):
                row = new[r].tolist()
                if eos in row:
                    k = row.index(eos) + 1
                    outs.append((row[:k], tok_lp[r, :k].tolist(), "stop"))
                else:
                    outs.append((row, tok_lp[r].tolist(), "length"))
        return [outs[i * n:(i + 1) * n] for i in range(len(prompts))]

    return generate


# ------------------------------------------------------------------------------------- measurements

def accuracy(generate, tokenizer, records: Sequence[dict], verifier, n: int = 1, temperature: float = 0.0,
             seed: int = 0) -> float:
    """Mean reward over records x n samples (greedy by default)."""
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in records]
    outs = generate(prompts, n, {"temperature": temperature, "seed": seed})
    total = 0.0
    for rec, group in zip(records, outs):
        for ids, _, _ in group:
            total += verifier.score(tokenizer.decode(ids, skip_special_tokens=True), rec["answer"], rec).reward
    return total / (len(records) * n)


def rollout_groups(generate, tokenizer, records: Sequence[dict], verifier, n: int, temperature: float,
                   seed: int) -> list[RolloutGroup]:
    """n sampled responses per record, scored -> RolloutGroups (as the trainer builds them)."""
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in records]
    outs = generate(prompts, n, {"temperature": temperature, "seed": seed})
    groups = []
    for rec, p, group in zip(records, prompts, outs):
        samples = []
        for ids, lps, fin in group:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            res = verifier.score(text, rec["answer"], rec)
            samples.append(Sample(p, ids, lps, res.reward, res.message, finish_reason=fin, record=rec,
                                  response_text=text))
        groups.append(RolloutGroup(p, samples, rec))
    return groups


def fix_rates(generate, tokenizer, records: Sequence[dict], verifier, templates: dict, variants: Sequence[str],
              n: int = 4, attempts: int = 2, temperature: float = 1.0, seed: int = 0) -> dict[str, dict]:
    """Per variant: zero_group_frac and fix success (per attempt, and per targeted wrong response) of
    the fix stage run on fresh rollouts of `records`."""
    out = {}
    for v in variants:
        groups = rollout_groups(generate, tokenizer, records, verifier, n, temperature, seed)
        res = run_fix_stage(groups, generate, verifier,
                            {"variant": v, "attempts": attempts, "max_per_group": 1, "templates": templates,
                             "sampling": {"temperature": temperature}}, tokenizer, seed=seed + 1)
        m = res.metrics
        out[v] = {"zero_group_frac": m["rfpo/zero_group_frac"], "fix_success_rate": m["rfpo/fix_success_rate"],
                  "fix_target_success_rate": m["rfpo/fix_target_success_rate"],
                  "fix_attempts": m["rfpo/fix_attempts"]}
    return out


# ------------------------------------------------------------------------------------ documented band

BAND_METRICS = {  # report key path -> label
    ("easy_acc_greedy",): "easy acc (greedy)",
    ("easy_acc_t1",): "easy acc (T=1)",
    ("hard_acc_greedy",): "hard acc (greedy)",
    ("hard_acc_t1",): "hard acc (T=1)",
    ("fix_on_hard", "reference", "fix_success_rate"): "reference fix success",
    ("sft", "final_loss"): "final SFT loss",
}


def _get(rep: dict, path: tuple) -> float | None:
    for k in path:
        if not isinstance(rep, dict) or k not in rep:
            return None
        rep = rep[k]
    return float(rep)


def check_band(rep: dict, band: dict) -> tuple[list[str], list[str]]:
    """Compare a warm-start report with the documented band (warmstart_band.json's "metrics":
    {"a.b.c": {"mean", "min", "max", "band": [lo, hi]}}). Returns (table lines, names outside the band)."""
    lines, outside = [f"{'metric':24s} {'measured':>9s}   documented band (mean)"], []
    for path, label in BAND_METRICS.items():
        b, v = band["metrics"].get(".".join(path)), _get(rep, path)
        if b is None or v is None:
            continue
        lo, hi = b["band"]
        ok = lo <= v <= hi
        outside += [] if ok else [label]
        lines.append(f"{label:24s} {v:9.3f}   [{lo:.3f}, {hi:.3f}] ({b['mean']:.3f})  {'ok' if ok else 'OUTSIDE'}")
    return lines, outside
