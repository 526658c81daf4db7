"""algo.adv_estimator=remax in the trainer: A_i = r_i - r(greedy response to the same prompt).

Unit tests: the greedy baseline generation in `train.generation.rollout` (one temperature-0 response per
prompt, scored, counted in the budget), and the advantages of a hand-made batch — after the real fix stage
appended a fix and after a pickle round trip (what `broadcast_groups` does) — against hand-computed values.
End to end: a 2-step tiny trainer run logs rollout/remax_baseline_reward_mean and counts the greedy
generations in rollout/generations_total.
"""
from __future__ import annotations

import os
import pickle
import subprocess

import pytest
import torch

from test_trainer_fixtures import ROOT, build_assets, run_trainer_cmd, tiny_overrides, trainer_env

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tiny_assets import build_tokenizer

    return build_tokenizer(str(tmp_path_factory.mktemp("tok")))


def digit_first(text, answer, record):
    """1.0 when the response starts with a digit, else 0.0 (with a message, as the fix prompts need one)."""
    ok = bool(text) and text[0].isdigit()
    return (1.0 if ok else 0.0, "" if ok else "does not start with a digit")


def _cfg(*overrides):
    from rfpo_megatron.config import load_config

    return load_config(CONFIG, ["algo.adv_estimator=remax", *overrides])


class FakeEngine:
    """generate(prompts, params): sampled responses are 'a1', 'b2', ... (reward 0: no leading digit) except
    the first of each prompt ('5': reward 1); the greedy (temperature 0) response is '7' for even prompts and
    'z' for odd ones. Records the sampling params of every call."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def generate(self, prompts, params):
        from rfpo_megatron.rollout.base import GenerateResult

        self.calls.append(params)
        out = []
        for i, _ in enumerate(prompts):
            if params.temperature == 0:
                texts = ["7" if i % 2 == 0 else "z"]
            else:
                texts = ["5"] + [f"{chr(97 + k)}{k}" for k in range(1, params.n)]
            out.append([GenerateResult(self.tok(t, add_special_tokens=False)["input_ids"], [-0.5] * len(t), "stop")
                        for t in texts])
        return out


def test_rollout_adds_one_scored_greedy_response_per_prompt(tok):
    from rfpo_megatron.data.template import PromptFormat
    from rfpo_megatron.train import Runtime, baseline_metrics, rollout

    cfg = _cfg("rollout.n_samples=3", "rollout.max_new_tokens=5")
    rt = Runtime(cfg, tokenizer=tok, prompt_format=PromptFormat(mode="plain"), verifier=digit_first,
                 engine=FakeEngine(tok), eos_ids=[])
    records = [{"id": f"r{i}", "prompt": f"{i}+{i}", "answer": str(2 * i)} for i in range(4)]
    groups = rollout(rt, records, seed=11)

    sampled, greedy = rt.engine.calls
    assert (sampled.n, sampled.temperature) == (3, cfg.rollout.temperature)
    assert (greedy.n, greedy.temperature, greedy.max_new_tokens) == (1, 0.0, 5)
    assert [g.baseline_reward for g in groups] == [1.0, 0.0, 1.0, 0.0]  # '7' / 'z'
    assert [g.rewards for g in groups] == [[1.0, 0.0, 0.0]] * 4  # the greedy response is not a sample
    assert rt.counters["generations"] == 4 * (3 + 1)
    assert rt.counters["generated_tokens"] == 4 * (1 + 2 + 2) + 4 * 1
    assert baseline_metrics(groups) == {"rollout/remax_baseline_reward_mean": 0.5}

    rt2 = Runtime(_cfg("algo.adv_estimator=grpo", "rollout.n_samples=3"), tokenizer=tok,
                  prompt_format=PromptFormat(mode="plain"), verifier=digit_first, engine=FakeEngine(tok), eos_ids=[])
    groups2 = rollout(rt2, records, seed=11)  # other estimators: no greedy generation
    assert len(rt2.engine.calls) == 1 and rt2.counters["generations"] == 12
    assert all(g.baseline_reward is None for g in groups2) and baseline_metrics(groups2) == {}


def _group(tok, prompt, texts, baseline):
    from rfpo_megatron.data.template import PromptFormat, encode_prompt
    from rfpo_megatron.data.types import RolloutGroup, Sample

    rec = {"id": prompt, "prompt": prompt, "answer": "0"}
    p = encode_prompt(tok, prompt, PromptFormat(mode="plain"))
    samples = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        r, msg = digit_first(t, "0", rec)
        samples.append(Sample(list(p), ids, [-0.1] * len(ids), r, msg, record=rec, response_text=t))
    return RolloutGroup(list(p), samples, rec, baseline_reward=baseline)


def test_remax_advantages_are_reward_minus_group_greedy_reward_fixes_included(tok):
    from rfpo_megatron.data.template import PromptFormat
    from rfpo_megatron.fix import run_fix_stage
    from rfpo_megatron.rewards import score_many
    from rfpo_megatron.train import advantages, build_batch

    groups = [_group(tok, "1+2", ["x", "yy", "zzz"], baseline=0.25),  # all wrong -> a fix is appended
              _group(tok, "3+4", ["1", "ab", "2"], baseline=1.0),
              _group(tok, "5+6", ["c", "9", "dd"], baseline=0.0)]

    def generate(prompts, n, sampling):  # the fix attempt: '42' (reward 1)
        return [[(tok("42", add_special_tokens=False)["input_ids"], [-1.0, -1.0], "stop")] * n for _ in prompts]

    def score(samples):
        for s, r in zip(samples, score_many(digit_first, [(s.response_text, "0", s.record) for s in samples])):
            s.reward, s.reward_message = r.reward, r.message

    fix_cfg = {"variant": "error_info", "attempts": 1, "max_per_group": 1, "placement": "append",
               "prompt_format": PromptFormat(mode="plain")}
    res = run_fix_stage(groups, generate, cfg=fix_cfg, tokenizer=tok, score=score, seed=1)
    groups = pickle.loads(pickle.dumps(res.groups))  # what broadcast_object_list does to them
    assert [g.num_fixed for g in groups] == [1, 0, 0] and [g.baseline_reward for g in groups] == [0.25, 1.0, 0.0]

    batch = build_batch(groups)
    old_logp = torch.zeros(batch.response_mask.shape)
    adv = advantages(_cfg(), batch, old_logp, None).advantages

    # by hand: rewards  g0 [0, 0, 0, 1 (fix)] - 0.25;  g1 [1, 0, 1] - 1;  g2 [0, 1, 0] - 0
    want = [-0.25, -0.25, -0.25, 0.75, 0.0, -1.0, 0.0, 0.0, 1.0, 0.0]
    assert batch.is_fixed.tolist() == [False] * 3 + [True] + [False] * 6
    lens = [len(r) for r in batch.response_ids]
    assert adv.shape == (10, max(lens))
    for i, (a, n) in enumerate(zip(want, lens)):
        assert adv[i, :n].tolist() == [a] * n, i
        assert adv[i, n:].abs().sum().item() == 0.0, i  # padding


def test_remax_without_baseline_rewards_fails(tok):
    from rfpo_megatron.train import advantages, build_batch

    groups = [_group(tok, "1+2", ["x", "1"], baseline=0.0), _group(tok, "3+4", ["y", "2"], baseline=None)]
    batch = build_batch(groups)
    assert batch.baseline_rewards is None
    with pytest.raises(ValueError, match="baseline_reward"):
        advantages(_cfg(), batch, torch.zeros(batch.response_mask.shape), None)


def test_tiny_trainer_remax_logs_baseline_and_counts_greedy_generations(tmp_path):
    from rfpo_megatron.logging import read_metrics

    assets = build_assets(str(tmp_path / "assets"))
    out = str(tmp_path / "run")
    overrides = tiny_overrides(assets, out, **{"algo.adv_estimator": "remax", "rfpo.enabled": "false",
                                              "data.reward_fn": "first_char_digit", "data.prompts_per_step": 2,
                                              "rollout.n_samples": 4, "trainer.save_interval": 0,
                                              "logging.wandb_mode": "disabled"})
    p = subprocess.run(run_trainer_cmd([CONFIG, *overrides]), env=trainer_env(), capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = read_metrics(os.path.join(out, "logs", "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    for k, r in enumerate(rows, start=1):
        base = r["rollout/remax_baseline_reward_mean"]
        assert base in (0.0, 0.5, 1.0)  # 2 prompts, 0/1 rewards
        assert r["rollout/num_samples"] == 2 * 4  # the greedy responses are not samples
        assert r["rollout/generations_total"] == k * 2 * (4 + 1)
