"""Fix stage with a scripted generate callable: selection, prompts, scoring on q, placement, metrics."""
import os
import sys

import pytest
import yaml

from rfpo_megatron.data.template import encode_prompt, format_prompt
from rfpo_megatron.data.types import RolloutGroup, Sample
from rfpo_megatron.fix import DEFAULT_TEMPLATES, FixStageConfig, render_fix_prompt, resolve_templates, run_fix_stage
from rfpo_megatron.rewards import RewardResult, score_many
from rfpo_megatron.rewards.addition import AdditionVerifier, addition_solution

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_cpu"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tiny_assets import build_tokenizer

    return build_tokenizer(str(tmp_path_factory.mktemp("tok")))


def rec(a, b):
    return {"id": f"{a}+{b}", "prompt": f"{a}+{b}", "answer": str(a + b), "solution": addition_solution(a, b)}


def group(tok, r, responses, verifier=AdditionVerifier()):
    p = encode_prompt(tok, r["prompt"])
    samples = []
    for i, text in enumerate(responses):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        res = score_many(verifier, [(text, r["answer"], r)])[0]
        samples.append(Sample(p, ids, [-0.1 * (i + 1)] * len(ids), res.reward, res.message, record=r,
                              response_text=text))
    return RolloutGroup(p, samples, r)


class ScriptedGenerate:
    """generate(prompts, n, sampling): pops scripted texts per call; records what it was given."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, list(script), []

    def __call__(self, prompts, n, sampling):
        self.calls.append((prompts, n, dict(sampling)))
        out = []
        for _ in prompts:
            row = []
            for _ in range(n):
                text = self.script.pop(0)
                ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                row.append((ids, [-1.0] * len(ids), "stop"))
            out.append(row)
        return out


WRONG = "1+1+0=2 ans=5"


def three_groups(tok):
    r0, r1, r2 = rec(12, 34), rec(25, 47), rec(3, 4)
    g0 = group(tok, r0, [WRONG, "ans=40", "x"])                               # all wrong
    g1 = group(tok, r1, [addition_solution(25, 47), WRONG, "ans=1"])          # mixed
    g2 = group(tok, r2, [addition_solution(3, 4)] * 3)                        # all right
    return [g0, g1, g2]


def test_all_wrong_replace_records_plain_prompt_and_original(tok):
    groups = three_groups(tok)
    orig0 = [list(s.response_ids) for s in groups[0].samples]
    orig_lp = list(groups[0].samples[0].rollout_logprobs)
    good = addition_solution(12, 34)
    gen = ScriptedGenerate(tok, ["ans=1", good, "ans=2", "ans=3"])  # target 0: 2nd attempt ok; target 1: none
    cfg = {"variant": "reference", "attempts": 2, "max_per_group": 2, "placement": "replace"}
    res = run_fix_stage(groups, gen, AdditionVerifier(), cfg, tok, sampling={"temperature": 0.7}, seed=5)

    prompts, n, samp = gen.calls[0]
    assert len(gen.calls) == 1 and n == 2 and len(prompts) == 2  # only group 0's first two responses
    assert samp == {"temperature": 0.7, "seed": 5}
    # the fix prompt: chat template around the rendered reference template
    want = format_prompt(tok, render_fix_prompt(DEFAULT_TEMPLATES["reference"], groups[0].record, WRONG, ""))
    assert tok.decode(prompts[0]) == want and "The correct final answer is: 46" in want

    g0 = groups[0]
    fixed = g0.samples[0]
    assert fixed.is_fixed and fixed.fix_variant == "reference" and not fixed.use_tis
    assert fixed.prompt_ids == g0.prompt_ids == encode_prompt(tok, "12+34")  # plain q, not the fix prompt
    assert fixed.prompt_ids != prompts[0]
    assert fixed.response_ids == tok(good, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert fixed.fixed_from == orig0[0] and fixed.fixed_from_logprobs == orig_lp
    assert fixed.rollout_logprobs == [-1.0] * len(fixed.response_ids)
    assert fixed.reward == 1.0 and fixed.response_text == good
    assert [list(s.response_ids) for s in g0.samples[1:]] == orig0[1:]  # unfixed slots untouched
    assert [len(g.samples) for g in groups] == [3, 3, 3] and groups[1].num_fixed == 0
    assert res.fixed_samples == [fixed] and res.groups[0] is g0

    m = res.metrics
    assert m["rfpo/zero_group_frac"] == pytest.approx(1 / 3)
    assert m["rfpo/full_group_frac"] == pytest.approx(1 / 3)
    assert m["rfpo/fix_attempts"] == 4 and m["rfpo/fix_targets"] == 2 and m["rfpo/fix_groups"] == 1
    assert m["rfpo/fix_success_rate"] == pytest.approx(1 / 4)
    assert m["rfpo/fix_success_rate/reference"] == pytest.approx(1 / 4)
    assert m["rfpo/fix_target_success_rate"] == pytest.approx(1 / 2)
    assert m["rfpo/fixed_seq_frac"] == pytest.approx(1 / 9)
    assert m["rfpo/fixed_group_frac"] == pytest.approx(1 / 3)
    assert [a.success for a in res.attempts] == [False, True, False, False]
    assert res.attempts[0].message == "final answer wrong; the ones column step is missing"  # fix 'ans=1'
    assert [a.verifier_reward for a in res.attempts] == [0.0, 1.0, 0.0, 0.0]


def test_any_wrong_append_and_max_per_group(tok):
    groups = three_groups(tok)
    good0, good1 = addition_solution(12, 34), addition_solution(25, 47)
    gen = ScriptedGenerate(tok, [good0, good1, "ans=0"])  # targets: g0 s0, g1 s1, g1 s2 (max 2 each)
    res = run_fix_stage(groups, gen, AdditionVerifier(),
                        {"variant": "reward", "trigger": "any_wrong", "max_per_group": 1, "placement": "append"}, tok)
    # max_per_group=1 -> one target per group: g0 s0 and g1 s1 (the first wrong one)
    assert len(gen.calls[0][0]) == 2
    assert [len(g.samples) for g in groups] == [4, 4, 3]
    assert groups[0].samples[3].is_fixed and groups[1].samples[3].is_fixed
    assert not any(s.is_fixed for s in groups[0].samples[:3])  # append keeps the wrong originals
    assert groups[1].samples[3].fixed_from == groups[1].samples[1].response_ids
    assert res.metrics["rfpo/fixed_seq_frac"] == pytest.approx(2 / 11)
    assert res.metrics["rfpo/fix_success_rate/reward"] == 1.0
    assert "This attempt is incorrect" in tok.decode(gen.calls[0][0][0])


def test_mixed_variants_cycle_and_error_info_prompt(tok):
    groups = [group(tok, rec(12, 34), ["7+5+0=12 ans=9"]), group(tok, rec(11, 11), ["ans=3"])]
    msg0 = groups[0].samples[0].reward_message
    gen = ScriptedGenerate(tok, ["ans=0", addition_solution(11, 11)])
    res = run_fix_stage(groups, gen, AdditionVerifier(), {"variant": ["error_info", "rewrite"]}, tok)
    p0, p1 = (tok.decode(p) for p in gen.calls[0][0])
    assert msg0 == "final answer wrong; first wrong step: the ones column (wrong digits)"
    assert "Verifier feedback: " + msg0 in p0 and "46" not in p0
    assert "Review the attempt" in p1 and "Verifier feedback" not in p1
    m = res.metrics
    assert m["rfpo/fix_success_rate/error_info"] == 0.0 and m["rfpo/fix_success_rate/rewrite"] == 1.0
    assert m["rfpo/fix_attempts/error_info"] == 1 and m["rfpo/fix_success_rate"] == 0.5
    assert groups[1].samples[0].fix_variant == "rewrite"


def test_scored_on_original_record_and_success_threshold(tok):
    seen = []

    def partial(response, answer, record):  # partial credit
        seen.append((answer, record["id"]))
        return RewardResult(0.5, "half") if "fix" in response else RewardResult(0.0, "no")

    def make():
        return [group(tok, rec(1, 2), ["ans=0", "ans=9"], verifier=lambda *a: RewardResult(0.0, "no"))]

    for thr, placed in ((1.0, False), (0.5, True)):
        groups = make()
        gen = ScriptedGenerate(tok, ["fix it"])
        res = run_fix_stage(groups, gen, partial, {"success_threshold": thr}, tok)
        assert groups[0].samples[0].is_fixed is placed
        assert res.metrics["rfpo/fix_success_rate"] == (1.0 if placed else 0.0)
    assert seen == [("3", "1+2"), ("3", "1+2")]  # the original answer and record, not the fix prompt
    assert groups[0].samples[0].reward == 0.5  # the verifier's reward is kept (binarised only for success)


class _Res:
    def __init__(self, ids):
        self.output_ids, self.logprobs, self.finish_reason = ids, [0.0] * len(ids), "length"


def test_score_callback_engine_objects_and_full_config(tok):
    from rfpo_megatron.config import Config

    cfg = Config()
    cfg.rfpo.fix.temperature, cfg.rfpo.fix.max_new_tokens = 0.3, 17
    cfg.rfpo.fix.templates = {"reference": "{prompt}|ref:{reference}"}
    groups = [group(tok, rec(2, 2), ["ans=5"])]
    calls = []

    def gen(prompts, n, sampling):
        calls.append(sampling)
        return [[_Res(tok("ans=4", add_special_tokens=False)["input_ids"])] for _ in prompts]

    def score(samples):
        for s in samples:
            s.reward, s.reward_message = 1.0, ""

    res = run_fix_stage(groups, gen, None, cfg, tok, score=score, sampling={"temperature": 1.0, "top_p": 1.0})
    assert calls == [{"temperature": 0.3, "top_p": 1.0, "max_new_tokens": 17}]
    s = groups[0].samples[0]
    assert s.is_fixed and s.finish_reason == "length" and s.response_text == "ans=4"
    assert res.attempts[0].fix_prompt_text == "2+2|ref:4"


def test_nothing_to_fix_makes_no_call(tok):
    groups = [group(tok, rec(1, 1), [addition_solution(1, 1)] * 2)]
    gen = ScriptedGenerate(tok, [])
    res = run_fix_stage(groups, gen, AdditionVerifier(), {}, tok)
    assert gen.calls == [] and res.fixed_samples == [] and res.metrics["rfpo/fix_success_rate"] == 0.0
    assert res.metrics["rfpo/full_group_frac"] == 1.0


def test_generate_output_count_checked(tok):
    groups = [group(tok, rec(1, 1), ["ans=0"])]
    with pytest.raises(RuntimeError, match="generate returned"):
        run_fix_stage(groups, lambda p, n, s: [], AdditionVerifier(), {"attempts": 2}, tok)


def test_templates_from_yaml_and_config_errors():
    y = yaml.safe_load('templates:\n  error_info: "Q {prompt} A {response} E {error} \\\\boxed{{x}}"\n')
    t = resolve_templates(y["templates"])
    r = {"prompt": "p", "answer": "7", "hints": ["h1", "h2"]}
    assert render_fix_prompt(t["error_info"], r, "resp", "bad") == "Q p A resp E bad \\boxed{{x}}"
    assert render_fix_prompt("{hints}|{solution}|{unknown}", r, "x") == "h1\nh2|7|{unknown}"
    with pytest.raises(ValueError, match=r"rfpo.fix.templates.reference: must contain \{reference\} or \{solution\}"):
        resolve_templates({"reference": "{prompt} try again"})
    with pytest.raises(ValueError, match="rfpo.fix.templates.bogus: unknown variant"):
        resolve_templates({"bogus": "x"})
    with pytest.raises(ValueError, match="rfpo.fix.variant='nope'"):
        FixStageConfig.from_any({"variant": "nope"})
    with pytest.raises(ValueError, match="rfpo.fix.trigger='some'"):
        FixStageConfig.from_any({"trigger": "some"})
    with pytest.raises(ValueError, match="rfpo.fix.placement"):
        FixStageConfig.from_any({"placement": "insert"})
    with pytest.raises(ValueError, match="rfpo.fix.attempts=0"):
        FixStageConfig.from_any({"attempts": 0})
