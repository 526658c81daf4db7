"""Fair fix feedback (issue 14, deliverable 5).

1. The reference answer reaches a fix prompt only through `{reference}`/`{solution}`: no `error_info`,
   `reward` or `rewrite` fix prompt — built by the real fix stage from the real verifiers' messages over
   many generated addition records and near-miss answers — contains the answer string beyond what the
   policy already had (its prompt and its own wrong response), while every `reference` prompt does.
   Before: the verifier messages read "extracted answer 5, expected 46; ..." and the test fails.
2. Fix success is judged on correctness (the verifier's score before DAPO overlong shaping): with
   L_max = 28 and L_cache = 10 a correct 23-token fix has training reward 0.5 < success_threshold 1.0 and
   is still placed (carrying the shaped reward 0.5). Before: it was not placed.
"""
from __future__ import annotations

import os
import random
import sys

import pytest

from rfpo_megatron.data.template import PromptFormat, encode_prompt
from rfpo_megatron.data.types import RolloutGroup, Sample
from rfpo_megatron.fix import DEFAULT_TEMPLATES, run_fix_stage
from rfpo_megatron.rewards import score_many
from rfpo_megatron.rewards.addition import AdditionVerifier, addition_solution, addition_steps, make_split
from rfpo_megatron.rewards.exact_match import ExactMatchVerifier

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "examples", "tiny_cpu"))
TINY_CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")
TINY_TEMPLATES = {  # the demo's short templates (examples/tiny_cpu/config.yaml)
    "rewrite": "{prompt}|{response}|fix:",
    "reward": "{prompt}|{response}|wrong|fix:",
    "error_info": "{prompt}|{response}|err:{error}|fix:",
    "reference": "{prompt}|{response}|ref:{solution}|fix:",
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tiny_assets import build_tokenizer

    return build_tokenizer(str(tmp_path_factory.mktemp("tok")))


# ------------------------------------------------------------------------------ near-miss responses

def near_misses(rec: dict, rng: random.Random) -> dict[str, str]:
    """Wrong responses to an addition record that are close to right (kind -> text)."""
    a, b = int(rec["a"]), int(rec["b"])
    steps, ans = addition_steps(a, b), a + b
    out = {
        "ans_plus_one": " ".join(steps + [f"ans={ans + 1}"]),       # every step right, answer off by one
        "ans_minus_ten": " ".join(steps + [f"ans={abs(ans - 10)}"]),
        "ans_extra_digit": " ".join(steps + [f"ans={ans}{rng.randrange(10)}"]),  # contains the answer
        "ans_dropped_digit": " ".join(steps + [f"ans={str(ans)[:-1] or '0'}"]),
        "no_ans": " ".join(steps),                                   # unparsable, steps right
        "empty": "",
    }
    i = rng.randrange(len(steps))  # one column sum off by one, the answer follows it
    lhs, s = steps[i].split("=")
    bad = int(s) + (1 if int(s) == 0 or rng.random() < 0.5 else -1)
    wrong = list(steps)
    wrong[i] = f"{lhs}={bad}"
    out["column_sum_off"] = " ".join(wrong + [f"ans={ans + (bad - int(s)) * 10 ** i}"])
    c = [int(x) for x in steps[i].replace("=", "+").split("+")]  # wrong carry, sum consistent with it
    c[2] = 1 - c[2]
    wrong = list(steps)
    wrong[i] = f"{c[0]}+{c[1]}+{c[2]}={c[0] + c[1] + c[2]}"
    out["wrong_carry"] = " ".join(wrong + [f"ans={ans + (c[2] * 2 - 1) * 10 ** i}"])
    if len(steps) > 1:  # stop one column early (the answer of the lower columns)
        out["missing_column"] = " ".join(steps[:-1] + [f"ans={ans % 10 ** (len(steps) - 1)}"])
    out["carries_ignored"] = " ".join(  # what a model that never carries writes
        [f"{s[0]}+{s[2]}+0={(int(s[0]) + int(s[2])) % 10}" for s in steps]
        + ["ans=" + "".join(str((int(s[0]) + int(s[2])) % 10) for s in steps[::-1]).lstrip("0")])
    out["right_steps_wrong_ans_twice"] = " ".join(steps + [f"ans={ans}", f"ans={ans + 2}"])  # last ans= counts
    return out


def records(n_per_digits: int = 20) -> list[dict]:
    recs = []
    for d, seed in ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5)):
        recs += make_split(n_per_digits, [d], seed=seed, prefix=f"d{d}-")
        recs += make_split(n_per_digits // 2, [d], seed=seed + 10, min_carries=min(d, 2), prefix=f"c{d}-")
    return recs


def wrong_groups(tok, verifier, fmt: PromptFormat) -> list[RolloutGroup]:
    """One group per record: its near misses that the verifier scores wrong (so all-wrong groups)."""
    rng, groups = random.Random(0), []
    for rec in records():
        prompt_ids = encode_prompt(tok, rec["prompt"], fmt)
        samples = []
        for kind, text in near_misses(rec, rng).items():
            res = score_many(verifier, [(text, rec["answer"], rec)])[0]
            if res.reward > 0:
                continue
            ids = tok(text, add_special_tokens=False)["input_ids"]
            samples.append(Sample(list(prompt_ids), ids, [-0.5] * len(ids), res.reward, res.message,
                                  record=rec, response_text=text))
        groups.append(RolloutGroup(list(prompt_ids), samples, rec))
    return groups


class CaptureGenerate:
    """generate(prompts, n, sampling): returns one wrong answer per attempt; keeps the prompts it got."""

    def __init__(self, tok):
        self.tok, self.prompts = tok, []

    def __call__(self, prompts, n, sampling):
        self.prompts += [self.tok.decode(p) for p in prompts]
        ids = self.tok("ans=0", add_special_tokens=False)["input_ids"]
        return [[(list(ids), [-1.0] * len(ids), "stop")] * n for _ in prompts]


@pytest.mark.parametrize("templates", ["default", "tiny_cpu"])
@pytest.mark.parametrize("strict", [False, True])
def test_no_fix_prompt_but_reference_contains_the_answer(tok, templates, strict):
    verifier = AdditionVerifier(require_steps=strict)
    fmt = PromptFormat(mode="auto")  # the tokenizer's chat template, as in training
    tpls = TINY_TEMPLATES if templates == "tiny_cpu" else {}
    n_targets, n_clean = 0, 0
    for variant in ("error_info", "reward", "rewrite", "reference"):
        groups = wrong_groups(tok, verifier, fmt)
        targets = [(g.record, s) for g in groups for s in g.samples]
        gen = CaptureGenerate(tok)
        res = run_fix_stage(groups, gen, verifier, {"variant": variant, "max_per_group": 0, "templates": tpls,
                                                    "prompt_format": fmt}, tok)
        assert len(gen.prompts) == len(targets) == len(res.attempts) > 500
        for (rec, s), prompt, att in zip(targets, gen.prompts, res.attempts):
            answer = rec["answer"]
            assert att.fix_prompt_text in prompt  # what the engine got: the rendered template, chat-wrapped
            if variant == "reference":
                assert answer in att.fix_prompt_text
                continue
            # what the fix prompt adds to what the policy already had (its prompt, its own response)
            added = prompt.replace(s.response_text, "<o>") if s.response_text else prompt
            added = added.replace(rec["prompt"], "<q>")
            assert answer not in added, (variant, s.reward_message, prompt)
            assert answer not in s.reward_message, (s.response_text, s.reward_message)
            n_targets += 1
            if answer not in s.response_text and answer not in rec["prompt"]:
                assert answer not in prompt, (variant, prompt)
                n_clean += 1
    assert n_targets > 1500 and n_clean > n_targets // 2  # most prompts are checked whole


def test_error_info_names_the_first_wrong_column_not_the_answer(tok):
    """Useful without the answer: the message locates the error in the step-by-step format."""
    v = AdditionVerifier()
    rec = {"prompt": "347+285", "answer": "632", "a": 347, "b": 285}
    cases = {
        "7+5+0=12 4+8+1=14 3+2+1=6 ans=642": "final answer wrong; first wrong step: the tens column (wrong sum)",
        "7+5+0=12 4+8+0=12 3+2+1=6 ans=622": "final answer wrong; first wrong step: the tens column (wrong carry)",
        "7+5+0=2 4+8+0=12 3+2+1=6 ans=622": "final answer wrong; first wrong step: the ones column (wrong sum)",
        "7+5+0=12 4+8+1=13 ans=32": "final answer wrong; the hundreds column step is missing",
        "7+5+0=12 4+8+1=13 3+2+1=6 ans=633":
            "final answer wrong; every column step is right, ans= does not follow from them",
        "7+5+0=12 4+8+1=13 3+2+1=6": "unparsable: no 'ans=<number>'",
    }
    groups = []
    for text, want in cases.items():
        res = v.score(text, rec["answer"], rec)
        assert (res.reward, res.message) == (0.0, want), text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        groups.append(RolloutGroup([1], [Sample([1], ids, [], res.reward, res.message, record=rec,
                                                response_text=text)], rec))
    gen = CaptureGenerate(tok)
    run_fix_stage(groups, gen, v, {"variant": "error_info", "prompt_format": PromptFormat(mode="plain")}, tok)
    for prompt, want in zip(gen.prompts, cases.values()):
        assert "Verifier feedback: " + want in prompt and "632" not in prompt
    assert DEFAULT_TEMPLATES["error_info"].count("{error}") == 1


def test_exact_match_feedback_never_shows_the_answer(tok):
    """Near misses against exact match with a step-by-step solution: quotes of the response's own text
    that contain the answer are dropped; the reference steps are never quoted."""
    v = ExactMatchVerifier()
    rec = {"prompt": "What is 6*7?", "answer": "42", "solution": "6*7 = 6*5 + 6*2\n= 30 + 12\n= 42\n42"}
    wrong = ["6*7 = 6*5 + 6*2\n= 30 + 12\n= 42\n\\boxed{43}",   # right steps, then a slip
             "6*7 = 40 + 2\n\\boxed{420}",                          # the answer inside the extracted one
             "6*7 = 6*5 + 6*2\n= 30 + 11\n\\boxed{41}",
             "The answer is 24", "", "\\boxed{4 2 0}"]
    groups = []
    for text in wrong:
        res = v.score(text, rec["answer"], rec)
        assert res.reward == 0.0 and "42" not in res.message and res.message, (text, res.message)
        ids = tok(text, add_special_tokens=False)["input_ids"] or [5]
        groups.append(RolloutGroup([1], [Sample([1], ids, [], res.reward, res.message, record=rec,
                                                response_text=text)], rec))
    assert v.score(wrong[2], "42", rec).message == (
        "extracted answer '41' is wrong; first step differing from the reference: step 2 ('= 30 + 11')")
    for variant in ("error_info", "reward", "rewrite"):
        gen = CaptureGenerate(tok)
        run_fix_stage(groups, gen, v, {"variant": variant, "prompt_format": PromptFormat(mode="plain")}, tok)
        for text, prompt in zip(wrong, gen.prompts):
            assert "42" not in prompt.replace(text, "<o>"), prompt


# ------------------------------------------------------------------ success on correctness, not shaping

class OneFixEngine:
    """Rollout: wrong answers ('ans=0'); fix prompts (the second call): the right 23-token solution."""

    def __init__(self, tok, fix_text):
        self.tok, self.fix_text, self.calls = tok, fix_text, 0

    def generate(self, prompts, params):
        from rfpo_megatron.rollout.base import GenerateResult

        self.calls += 1
        text = "ans=0" if self.calls == 1 else self.fix_text
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return [[GenerateResult(list(ids), [-0.5] * len(ids), "stop") for _ in range(params.n)] for _ in prompts]


def test_overlong_shaping_does_not_fail_a_correct_fix(tok):
    from rfpo_megatron.config import load_config
    from rfpo_megatron.train import Runtime, fix_stage, rollout

    cfg = load_config(TINY_CONFIG, ["algo.max_response_len=28", "algo.overlong_buffer_len=10",
                                    "rollout.max_new_tokens=28", "rollout.n_samples=2", "rfpo.fix.attempts=1",
                                    "rfpo.fix.max_per_group=1", "rfpo.fix.variant=error_info"])
    assert cfg.rfpo.fix.success_threshold == 1.0
    rec = {"id": "r0", "prompt": "15+42", "answer": "57", "a": 15, "b": 42}
    good = addition_solution(15, 42)  # "5+2+0=7 1+4+0=5 ans=57": 22 characters + EOS = 23 tokens
    assert len(tok(good, add_special_tokens=False)["input_ids"]) + 1 == 23
    engine = OneFixEngine(tok, good)
    rt = Runtime(cfg, tokenizer=tok, prompt_format=PromptFormat(mode="plain"), verifier=AdditionVerifier(),
                 engine=engine, eos_ids=[tok.eos_token_id])
    groups = rollout(rt, [rec], seed=3)
    assert groups[0].rewards == [0.0, 0.0]  # 'ans=0' + EOS: 6 tokens, no shaping; wrong
    groups, m = fix_stage(rt, groups, seed=4)

    # a correct fix: placed, counted as a success ...
    fixed = groups[0].samples[0]
    assert fixed.is_fixed and fixed.response_text == good
    # ... whose training reward is shaped: 1 + ((28 - 10) - 23) / 10 = 0.5 < success_threshold
    assert len(fixed.response_ids) == 23 and fixed.reward == pytest.approx(0.5)
    assert m["rfpo/fix_success_rate"] == 1.0 and m["rfpo/fix_target_success_rate"] == 1.0
    assert m["rfpo/fix_generations"] == 1.0 and m["rfpo/fix_generated_tokens"] == 23.0
    assert not groups[0].samples[1].is_fixed and groups[0].samples[1].reward == 0.0


def test_score_callback_returns_correctness_for_success(tok):
    """run_fix_stage(score=...): success uses the verifier scores the callback returns (before shaping);
    a callback that returns None keeps the old contract (success on `reward`)."""
    rec = {"id": "x", "prompt": "1+2", "answer": "3", "a": 1, "b": 2}
    ids = tok("ans=0", add_special_tokens=False)["input_ids"]

    def groups():
        return [RolloutGroup([1], [Sample([1], list(ids), [], 0.0, "final answer wrong", record=rec,
                                          response_text="ans=0")], rec)]

    def gen(prompts, n, sampling):
        good = tok(addition_solution(1, 2), add_special_tokens=False)["input_ids"]
        return [[(good, [0.0] * len(good), "stop")] * n for _ in prompts]

    def shaped(samples):  # verifier says right, shaping halves the training reward
        for s in samples:
            s.reward, s.reward_message = 0.5, ""
        return [1.0] * len(samples)

    def shaped_silent(samples):
        shaped(samples)

    fmt = PromptFormat(mode="plain")
    g = groups()
    res = run_fix_stage(g, gen, None, {"prompt_format": fmt}, tok, score=shaped)
    assert g[0].samples[0].is_fixed and g[0].samples[0].reward == 0.5
    assert [(a.success, a.reward, a.verifier_reward) for a in res.attempts] == [(True, 0.5, 1.0)]
    g = groups()
    res = run_fix_stage(g, gen, None, {"prompt_format": fmt}, tok, score=shaped_silent)
    assert not g[0].samples[0].is_fixed and res.attempts[0].verifier_reward == 0.5

    def short(samples):
        return []

    with pytest.raises(RuntimeError, match="score returned 0 verifier scores for 1 fixes"):
        run_fix_stage(groups(), gen, None, {"prompt_format": fmt}, tok, score=short)
