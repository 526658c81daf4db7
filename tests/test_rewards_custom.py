"""Custom reward functions by path (`data.reward_fn: "module:fn"` / `"file.py:fn"`) under the error policy.

Every reward below is a real file written to tmp_path (outside the package) and loaded through the registry
(`build_reward(cfg.data)`, the trainer's path); expected rewards are worked out by hand from the file's code.
"""
from __future__ import annotations

import sys
import textwrap

import pytest

from rfpo_megatron.config import ConfigError, load_config
from rfpo_megatron.rewards import build_reward
from rfpo_megatron.rewards.guard import ERROR_MESSAGE, RewardError
from rfpo_megatron.rewards.registry import check_reward_spec

USER_FILE = '''
import asyncio, math
from rfpo_megatron.rewards.base import RewardResult

def per_sample(response_text, answer, record, bonus=0.0):
    ok = response_text.strip() == answer
    return (1.0 + bonus if ok else 0.0), ("" if ok else f"wrong for {record['topic']}")

def batched(items, scale=1.0):
    return [{"reward": scale * len(r), "message": rec["id"]} for r, a, rec in items]

async def async_one(response_text, answer, record):
    await asyncio.sleep(0.01)
    return RewardResult(float(len(response_text)), "async")

def flaky(response_text, answer, record):
    if response_text == "boom":
        raise ZeroDivisionError("division by zero")
    if response_text == "nan":
        return math.nan
    if response_text == "bad":
        return "not a number"
    return 1.0

class Scorer:
    def __init__(self, threshold=2):
        self.threshold = threshold
    def score(self, response_text, answer, record):
        return float(len(response_text) >= self.threshold)

class BatchScorer:
    def score_batch(self, items):
        return [0.5] * len(items)

def two_args(response_text, answer):
    return 1.0

NOT_CALLABLE = 3
'''


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return str(path)


def _reward(spec, *overrides):
    cfg = load_config(None, [f"data.reward_fn={spec}", *overrides])
    return cfg, build_reward(cfg.data)


def _items(*texts, answer="42"):
    return [(t, answer, {"id": f"r{i}", "prompt": "p", "answer": answer, "topic": "algebra"})
            for i, t in enumerate(texts)]


def test_per_sample_function_with_kwargs(user_file):
    _, v = _reward(f"{user_file}:per_sample", "data.reward_kwargs={bonus: 0.5}")
    out = v.score_batch(_items("42", " 7 "))
    assert [(r.reward, r.message) for r in out] == [(1.5, ""), (0.0, "wrong for algebra")]


def test_batched_async_and_classes(user_file):
    _, v = _reward(f"{user_file}:batched", "data.reward_kwargs={scale: 2}")
    assert [(r.reward, r.message) for r in v.score_batch(_items("abc", "x"))] == [(6.0, "r0"), (2.0, "r1")]
    _, v = _reward(f"{user_file}:async_one")
    assert [(r.reward, r.message) for r in v.score_batch(_items("abcd", ""))] == [(4.0, "async"), (0.0, "async")]
    _, v = _reward(f"{user_file}:Scorer", "data.reward_kwargs={threshold: 3}")
    assert [r.reward for r in v.score_batch(_items("ab", "abc"))] == [0.0, 1.0]
    _, v = _reward(f"{user_file}:BatchScorer")
    assert [r.reward for r in v.score_batch(_items("a", "b", "c"))] == [0.5, 0.5, 0.5]


def test_module_path_spec(user_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    _, v = _reward("my_rewards:per_sample")
    assert v.score_batch(_items("42"))[0].reward == 1.0


@pytest.mark.parametrize("spec,needle", [
    ("{dir}/missing.py:fn", "not found"),
    ("{file}:nope", "has no attribute 'nope'"),
    ("{file}:two_args", "signature"),
    ("{file}:NOT_CALLABLE", "not a function or class"),
    ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'"),
])
def test_bad_specs_fail_early_in_one_line(user_file, tmp_path, spec, needle):
    spec = spec.format(dir=tmp_path, file=user_file)
    cfg = load_config(None, [f"data.reward_fn={spec}"])
    with pytest.raises(ConfigError) as e:
        check_reward_spec(cfg.data)
    msg = str(e.value)
    assert needle in msg and "data.reward_fn" in msg and len(msg.splitlines()) == 1, msg


def test_wrong_kwargs_are_a_signature_error(user_file):
    cfg = load_config(None, [f"data.reward_fn={user_file}:per_sample", "data.reward_kwargs={bonsu: 1}"])
    with pytest.raises(ConfigError, match="bonsu"):
        check_reward_spec(cfg.data)


def test_errors_raise_naming_function_and_record(user_file):
    _, v = _reward(f"{user_file}:flaky")
    for text, needle in (("boom", "ZeroDivisionError: division by zero"), ("nan", "non-finite"),
                         ("bad", "not a number")):
        with pytest.raises(RewardError) as e:
            v.score_batch(_items("fine", text))
        msg = str(e.value)
        assert f"'{user_file}:flaky' failed on record 'r1'" in msg and needle in msg and "\n" not in msg, msg


def test_zero_policy_scores_zero_and_counts(user_file):
    _, v = _reward(f"{user_file}:flaky", "data.reward_error_policy=zero")
    out = v.score_batch(_items("fine", "boom", "nan", "ok"))
    assert [r.reward for r in out] == [1.0, 0.0, 0.0, 1.0]
    assert out[1].message == ERROR_MESSAGE
    assert v.pop_errors() == 2 and v.pop_errors() == 0


def test_builtin_goes_through_the_same_guard():
    cfg, v = _reward("addition")
    out = v.score_batch([("7+5+0=12 ans=12", "12", {"id": "a", "a": 7, "b": 5})])
    assert out[0].reward == 1.0 and v.pop_errors() == 0


def test_config_validation_names_fields():
    with pytest.raises(ConfigError, match="data.reward_error_policy"):
        load_config(None, ["data.reward_error_policy=ignore"])
    with pytest.raises(ConfigError, match="data.reward_fn"):
        load_config(None, ["data.reward_fn=:fn"])
    with pytest.raises(ConfigError, match="data.reward_url"):
        load_config(None, ["data.reward_url=localhost:8000"])
    with pytest.raises(ConfigError, match="data.reward_url_attempts"):
        load_config(None, ["data.reward_url=http://x", "data.reward_url_attempts=0"])
    with pytest.raises(ConfigError, match="data.reward_kwargs"):
        load_config(None, ["data.reward_url=http://x", "data.reward_kwargs={a: 1}"])
