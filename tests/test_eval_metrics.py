"""Evaluation: pass@k (unbiased estimator) and avg@k against brute-force enumeration, and a real
`evaluate_sets` pass through the embedded engine over loopback scored against a hand-scored reference."""
from __future__ import annotations

import itertools
import json
import os
import random

import pytest

from rfpo_megatron.evaluate import pass_at_k, score_set


def _pass_at_k_bruteforce(correct: list[bool], k: int) -> float:
    """Share of all k-subsets of the n samples that contain a correct one."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_subset_enumeration():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        c = [rng.random() < 0.3 for _ in range(n)]
        assert pass_at_k(n, sum(c), k) == pytest.approx(_pass_at_k_bruteforce(c, k), abs=1e-12)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_score_set_hand_worked():
    correct = [[True, False, False, False], [False] * 4, [True, True, True, True]]
    m = score_set(correct, 4)
    assert m["avg@4"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    m2 = score_set(correct, 2)  # pass@2 from 4 samples with c=1: 1 - C(3,2)/C(4,2) = 0.5
    assert m2["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m2["avg@2"] == pytest.approx((0.5 + 0 + 1) / 3)
    # the pass@k curve: powers of two below k from the same samples; pass@1 = avg over all n samples
    assert sorted(m) == ["avg@4", "pass@1", "pass@2", "pass@4"]
    assert m["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3) and m["pass@2"] == pytest.approx(m2["pass@2"])
    m6 = score_set([[True] + [False] * 5], 6)  # j in 1, 2, 4, 6: 1 - C(5, j) / C(6, j) = j / 6
    assert sorted(m6) == ["avg@6", "pass@1", "pass@2", "pass@4", "pass@6"]
    assert [m6[f"pass@{j}"] for j in (1, 2, 4, 6)] == pytest.approx([1 / 6, 2 / 6, 4 / 6, 1.0])


def test_evaluate_sets_through_embedded_engine(tmp_path):
    from transformers import AutoTokenizer

    from rfpo_megatron.config import load_config
    from rfpo_megatron.data.batching import build_prompts
    from rfpo_megatron.data.template import PromptFormat
    from rfpo_megatron.evaluate import evaluate_sets
    from rfpo_megatron.rewards import get_reward_fn
    from rfpo_megatron.rollout.base import SamplingParams
    from rfpo_megatron.rollout.launch import launch_embedded_server
    from test_trainer_fixtures import FirstCharDigit, build_assets

    assets = build_assets(str(tmp_path / "assets"))
    tok = AutoTokenizer.from_pretrained(assets["model"])
    cfg = load_config(None, ["rollout.max_new_tokens=6", "trainer.eval_n_samples=3", "rollout.temperature=1.0"])
    with open(assets["eval"]) as fh:
        records = [json.loads(line) for line in fh]
    fmt = PromptFormat(mode="auto")
    engine = launch_embedded_server(assets["model"], log_dir=str(tmp_path / "logs"))
    try:
        ver = FirstCharDigit()
        m = evaluate_sets(engine, tok, ver, {"easy": records}, cfg, seed=11, eos_ids=[tok.eos_token_id],
                          prompt_format=fmt)
        # independent reference: the same seeded requests, scored by hand
        items = build_prompts(records, tok, fmt)
        res = engine.generate([it.prompt_ids for it in items],
                              SamplingParams(n=3, temperature=1.0, max_new_tokens=6, stop_token_ids=[tok.eos_token_id],
                                             seed=11))
        corr = [[tok.decode(r.output_ids, skip_special_tokens=True)[:1].isdigit() for r in per] for per in res]
    finally:
        engine.shutdown()
    assert set(m) == {"eval/easy/avg@3", "eval/easy/pass@1", "eval/easy/pass@2", "eval/easy/pass@3",
                      "eval/easy/response_len_mean"}
    assert m["eval/easy/pass@1"] == pytest.approx(m["eval/easy/avg@3"])
    assert m["eval/easy/avg@3"] == pytest.approx(sum(map(sum, corr)) / (3 * len(corr)))
    assert m["eval/easy/pass@3"] == pytest.approx(sum(any(c) for c in corr) / len(corr))
    assert get_reward_fn("arithmetic") is not None
