"""Prepare the tiny CPU demo: char-level tokenizer, addition data, tiny Qwen2 model, warm-start SFT.

    python examples/tiny_cpu/prepare.py [--force] [--sft-steps N] [--skip-measure]

Writes examples/tiny_cpu/artifacts/{tokenizer,data,model}/ and artifacts/warmstart_report.json
(easy/hard accuracy after SFT, fix success per variant). Idempotent: a finished step is skipped
unless --force (a DONE marker records the settings it was built with).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ART = os.path.join(HERE, "artifacts")


def log(msg: str) -> None:
    print(f"[prepare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_templates(config_path: str) -> tuple[dict, str]:
    """The fix templates and the reward fn name from the RL config (so SFT's fix examples and the
    measurements match what RL will use)."""
    import yaml

    with open(config_path) as f:
        cfg = yaml.safe_load(f) or {}
    fix = (cfg.get("rfpo") or {}).get("fix") or {}
    return dict(fix.get("templates") or {}), (cfg.get("data") or {}).get("reward_fn", "addition")


def _done(path: str, settings: dict) -> bool:
    marker = os.path.join(path, "DONE.json")
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return json.load(f) == settings


def _mark(path: str, settings: dict) -> None:
    with open(os.path.join(path, "DONE.json"), "w") as f:
        json.dump(settings, f)


TASKS = {  # difficulty knob of the addition task
    "digits": dict(easy_digits=[1, 2], hard_digits=[3]),  # hard = longer than anything seen in SFT
    "carries": dict(easy_digits=[1, 2, 3], hard_digits=[2, 3], max_carries_easy=0, min_carries_hard=1),
    # easy = 1-2 digit sums (carries included) and 3-digit sums without a carry; hard = 3-digit sums with
    # >= 1 carry: reading 3 digits and carrying are both in the warm start, only their composition is new
    "compose": dict(easy_digits=[1, 2, 3], hard_digits=[3], max_carries_easy={3: 0}, min_carries_hard=1),
    # as compose, but a carry out of the top column alone counts as easy (hard = a column receives a carry)
    "compose_carry_in": dict(easy_digits=[1, 2, 3], hard_digits=[3], max_carries_easy={3: 0},
                             min_carries_hard=1, carry_kind="carry_ins"),
}


def make_data(out: str, seed: int, task: str = "compose") -> dict:
    """train_easy (SFT), train_hard, train_rl (RL prompts: easy+hard interleaved), eval_easy, eval_hard."""
    from rfpo_megatron.rewards.addition import write_jsonl, write_splits

    splits = write_splits(out, n_train_easy=3000, n_train_hard=512, n_eval=128, seed=seed, **TASKS[task])
    rng = random.Random(seed)
    easy = rng.sample(splits["train_easy"], 512)
    mix = [r for pair in zip(easy, splits["train_hard"]) for r in pair]
    write_jsonl(os.path.join(out, "train_rl.jsonl"), mix)
    return {k: len(v) for k, v in splits.items()} | {"train_rl": len(mix)}


# the settings that define the warm-start recipe (the band in warmstart_band.json holds for its "recipe" of these)
def _env_threads() -> int:
    """OMP_NUM_THREADS's first number ("4,2" -> 4), else 1."""
    head = (os.environ.get("OMP_NUM_THREADS") or "1").split(",")[0].strip()
    return int(head) if head.isdigit() and int(head) > 0 else 1


RECIPE_KEYS = ("task", "sft_steps", "sft_gate", "sft_decay", "sft_hold", "sft_final_fix", "sft_reheat",
               "sft_restarts", "batch_size", "lr", "fix_frac", "hard_fix_n")


def recipe_defaults() -> dict:
    """The default recipe: this script's defaults of RECIPE_KEYS (tools/reproduce.py runs exactly these)."""
    p = parser()
    return {k: p.get_default(k) for k in RECIPE_KEYS}


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    return run(a)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="rebuild everything")
    p.add_argument("--sft-steps", type=int, default=6000,
                   help="SFT step cap (with --sft-gate) or the cosine length (--sft-gate 0)")
    p.add_argument("--sft-gate", type=float, default=0.9,
                   help="hold the lr until the greedy accuracy on 64 SFT prompts (probed every 200 steps) reaches "
                        "this, then decay; --sft-steps is the cap (0: plain cosine over --sft-steps)")
    p.add_argument("--sft-decay", type=int, default=500, help="decay steps after the gate")
    p.add_argument("--sft-hold", type=int, default=3000,
                   help="most steps a phase holds the lr waiting for the gate before it decays anyway (0: no cap)")
    p.add_argument("--sft-final-fix", type=float, default=0.8,
                   help="final check after each decay: the probe reaches --sft-gate and the greedy `reference` fix "
                        "success on 64 held-out hard problems reaches this; otherwise the lr reheats (hold, gate, "
                        "decay, check again) while --sft-steps leaves room")
    p.add_argument("--sft-reheat", type=float, default=1 / 3,
                   help="each reheat phase's lr = this x the previous phase's (1/3, 1/9, ... of --lr)")
    p.add_argument("--sft-restarts", type=int, default=1,
                   help="how many times a run that ends with its final check failing starts again from a fresh "
                        "init (init seed + 1000)")
    p.add_argument("--init-seed", type=int, default=None,
                   help="model init and SFT batch order (default: --seed; data and probes follow --seed)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--fix-frac", type=float, default=1.0, help="share of SFT records also given as fix examples")
    p.add_argument("--hard-fix-n", type=int, default=1500,
                   help="also add this many fix-format examples (reference variant) on train_hard problems")
    p.add_argument("--task", choices=sorted(TASKS), default="compose",
                   help="difficulty knob (TASKS): compose (hard = 3-digit sums with a carry; default), "
                        "compose_carry_in, carries (easy = no carry at all) or digits (easy = 1-2 digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=_env_threads(),
                   help="torch threads (default: OMP_NUM_THREADS, else 1; 1 is fastest on a busy box, 2 helps "
                        "only on an idle one; the band holds at 1 and 2)")
    p.add_argument("--config", default=os.path.join(HERE, "config.yaml"))
    p.add_argument("--skip-measure", action="store_true")
    p.add_argument("--out", default=ART)
    return p


def run(a: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from rfpo_megatron.data.dataset import load_prompt_set
    from rfpo_megatron.fix.templates import VARIANTS
    from rfpo_megatron.rewards import get_reward_fn
    from tiny_assets import build_tokenizer, tiny_qwen2_config
    from rfpo_megatron.rewards.addition import make_split
    from warmstart import accuracy, fix_rates, hf_generate_fn, sft_examples, sft_with_restarts

    t0 = time.time()
    tok_dir, data_dir, model_dir = (os.path.join(a.out, d) for d in ("tokenizer", "data", "model"))
    templates, reward_name = load_templates(a.config)

    # 1) tokenizer
    if a.force or not _done(tok_dir, {"v": 2}):
        build_tokenizer(tok_dir)
        _mark(tok_dir, {"v": 2})
        log(f"tokenizer -> {tok_dir}")
    else:
        log(f"tokenizer exists ({tok_dir})")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)

    # 2) data
    if a.force or not _done(data_dir, {"v": 2, "seed": a.seed, "task": a.task}):
        counts = make_data(data_dir, a.seed, a.task)
        _mark(data_dir, {"v": 2, "seed": a.seed, "task": a.task})
        log(f"data -> {data_dir} {counts}")
    else:
        log(f"data exists ({data_dir})")

    # 3) model + warm-start SFT
    init_seed = a.seed if a.init_seed is None else a.init_seed
    settings = {"v": 6, "task": a.task, "steps": a.sft_steps, "gate": a.sft_gate, "decay": a.sft_decay,
                "hold": a.sft_hold, "final": [a.sft_final_fix, a.sft_reheat, a.sft_restarts], "bs": a.batch_size,
                "lr": a.lr, "fix_frac": a.fix_frac, "hard_fix_n": a.hard_fix_n, "seed": a.seed, "init": init_seed,
                "templates": templates}
    if a.force or not _done(model_dir, settings):
        easy = load_prompt_set(os.path.join(data_dir, "train_easy.jsonl")).records
        examples = sft_examples(easy, tokenizer, templates, a.fix_frac, VARIANTS, seed=a.seed)
        seen = {r["prompt"] for f in ("train_hard", "eval_hard")
                for r in load_prompt_set(os.path.join(data_dir, f + ".jsonl")).records}
        if a.hard_fix_n > 0:  # fix-format only: the plain hard prompts are never trained on
            hard = make_split(a.hard_fix_n, TASKS[a.task]["hard_digits"], a.seed + 99, prefix="sftfix",
                              exclude=seen, min_carries=TASKS[a.task].get("min_carries_hard", 0),
                              carry_kind=TASKS[a.task].get("carry_kind", "carries"))
            examples += [ex for i, ex in enumerate(sft_examples(hard, tokenizer, templates, 1.0, ["reference"],
                                                                seed=a.seed + 1)) if i % 2 == 1]
            seen |= {r["prompt"] for r in hard}
        ver = get_reward_fn(reward_name)
        probe_recs = random.Random(a.seed + 7).sample(easy, 64)  # the gate's probe: SFT prompts, greedy
        fix_recs = make_split(64, TASKS[a.task]["hard_digits"], a.seed + 77, prefix="probefix", exclude=seen,
                              min_carries=TASKS[a.task].get("min_carries_hard", 0),
                              carry_kind=TASKS[a.task].get("carry_kind", "carries"))  # never trained on

        def probe(m) -> float:
            return accuracy(hf_generate_fn(m, tokenizer, max_new_tokens=64), tokenizer, probe_recs, ver, seed=None)

        def final_check(m) -> tuple[bool, dict]:
            gen = hf_generate_fn(m, tokenizer, max_new_tokens=64)
            easy_acc = accuracy(gen, tokenizer, probe_recs, ver, seed=None)
            fix = fix_rates(gen, tokenizer, fix_recs, ver, templates, ["reference"], n=1, attempts=1,
                            temperature=0.0, seed=3)["reference"]["fix_success_rate"]
            return (easy_acc >= a.sft_gate and fix >= a.sft_final_fix,
                    {"probe": round(easy_acc, 3), "reference_fix_greedy": round(fix, 3)})

        def make_model(seed: int):
            torch.manual_seed(seed)
            m = Qwen2ForCausalLM(tiny_qwen2_config(tokenizer))
            log(f"warm-start SFT (init seed {seed}): {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params, "
                f"{len(examples)} examples ({len(examples) - len(easy)} fix-format), cap {a.sft_steps} steps x "
                f"{a.batch_size}")
            return m

        model, res, attempts = sft_with_restarts(
            make_model, init_seed, a.sft_restarts, log, examples=examples, steps=a.sft_steps,
            batch_size=a.batch_size, lr=a.lr, probe=probe, gate=a.sft_gate, decay=a.sft_decay,
            hold=a.sft_hold if a.sft_hold > 0 else None, final_check=final_check if a.sft_gate > 0 else None,
            reheat=a.sft_reheat)
        losses = res["losses"]
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "sft_log.json"), "w") as f:
            json.dump({"steps": len(losses), "gated_at": res["gated_at"], "probes": res["probes"],
                       "checks": res["checks"], "reheats": res["reheats"], "init_seed": attempts[-1]["init_seed"],
                       "restarts": len(attempts) - 1, "attempts": attempts,
                       "final_loss": sum(losses[-50:]) / len(losses[-50:]),
                       "loss_per_100": [sum(losses[i:i + 100]) / len(losses[i:i + 100])
                                        for i in range(0, len(losses), 100)]}, f)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        _mark(model_dir, settings)
        log(f"model -> {model_dir}")
    else:
        log(f"warm-started model exists ({model_dir})")

    # 4) measurements
    report_path = os.path.join(a.out, "warmstart_report.json")
    if not a.skip_measure and (a.force or not os.path.exists(report_path)):
        model = Qwen2ForCausalLM.from_pretrained(model_dir).eval()
        gen = hf_generate_fn(model, tokenizer, max_new_tokens=64)
        ver = get_reward_fn(reward_name)
        ev_e = load_prompt_set(os.path.join(data_dir, "eval_easy.jsonl")).records
        ev_h = load_prompt_set(os.path.join(data_dir, "eval_hard.jsonl")).records
        rep = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                           "cpu_capability": torch.backends.cpu.get_cpu_capability()},  # what the band's runs vary (docs/benchmarks.md "warm start")
               "reward_fn": reward_name, "easy_acc_greedy": accuracy(gen, tokenizer, ev_e, ver),
               "hard_acc_greedy": accuracy(gen, tokenizer, ev_h, ver),
               "easy_acc_t1": accuracy(gen, tokenizer, ev_e, ver, n=4, temperature=1.0, seed=1),
               "hard_acc_t1": accuracy(gen, tokenizer, ev_h, ver, n=4, temperature=1.0, seed=1)}
        log(f"after SFT: easy acc {rep['easy_acc_greedy']:.3f} (greedy) / {rep['easy_acc_t1']:.3f} (T=1), "
            f"hard acc {rep['hard_acc_greedy']:.3f} / {rep['hard_acc_t1']:.3f}")
        rep["fix_on_hard"] = fix_rates(gen, tokenizer, ev_h[:64], ver, templates, VARIANTS, n=4, attempts=2,
                                       temperature=1.0, seed=2)
        for v, r in rep["fix_on_hard"].items():
            log(f"fix on hard [{v:10s}] success/attempt {r['fix_success_rate']:.3f}  "
                f"fixed targets {r['fix_target_success_rate']:.3f}  (zero groups {r['zero_group_frac']:.2f})")
        sft_log = os.path.join(model_dir, "sft_log.json")
        if os.path.exists(sft_log):
            with open(sft_log) as f:
                rep["sft"] = {k: v for k, v in json.load(f).items()
                              if k not in ("loss_per_100", "probes", "checks", "attempts")}
        with open(report_path, "w") as f:
            json.dump(rep, f, indent=1)
        log(f"report -> {report_path}")
    if os.path.exists(report_path) and os.path.exists(BAND_FILE):
        report_vs_band(report_path, a)
    log(f"done in {time.time() - t0:.0f}s; model: {model_dir}")
    return 0


BAND_FILE = os.path.join(HERE, "warmstart_band.json")


def report_vs_band(report_path: str, a: argparse.Namespace) -> bool:
    """Print the warm start's numbers next to the documented band (warmstart_band.json); True if inside.

    The band holds for the recipe it was measured with (its "recipe" entry); other settings only get the
    table, with a note."""
    from warmstart import check_band

    with open(BAND_FILE) as f:
        band = json.load(f)
    with open(report_path) as f:
        rep = json.load(f)
    lines, outside = check_band(rep, band)
    m = rep.get("machine", {})
    log(f"warm start ({m.get('threads', '?')} thread(s), {m.get('cpu_capability', '?')} kernels) vs the documented "
        f"band ({band['measured'].split(';')[0]}):")
    for line in lines:
        print("    " + line, flush=True)
    mine = {k: getattr(a, k) for k in RECIPE_KEYS}
    other = {k: v for k, v in mine.items() if band["recipe"].get(k) != v}
    if other:
        log(f"note: settings differ from the band's recipe ({other} vs {band['recipe']}): the band does not apply")
        return not outside
    if outside:
        log("WARNING: the warm start is OUTSIDE the documented band for " + ", ".join(outside) + ". RL results "
            "from it will not match docs/benchmarks.md. What to do: check `pip list` against constraints.txt "
            "(make setup installs those pins), re-run with another --seed or --threads and --force, and "
            "report it (with artifacts/warmstart_report.json and model/sft_log.json) if it stays outside.")
    else:
        log("warm start inside the documented band")
    return not outside


if __name__ == "__main__":
    raise SystemExit(main())
