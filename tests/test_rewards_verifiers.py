"""Verifiers: addition task (steps, first wrong step), exact match, math-verify equivalences, registry."""
import random

import pytest

from rfpo_megatron.rewards import RewardResult, get_reward_fn, score_many
from rfpo_megatron.rewards.addition import (AdditionVerifier, addition_solution, addition_steps, count_carries,
                                            count_carry_ins, make_problem, make_split)
from rfpo_megatron.rewards.exact_match import ExactMatchVerifier, extract_answer, last_boxed


def test_addition_steps_hand_worked():
    # 347 + 285: 7+5=12 (carry 1), 4+8+1=13 (carry 1), 3+2+1=6 -> 632
    assert addition_steps(347, 285) == ["7+5+0=12", "4+8+1=13", "3+2+1=6"]
    assert addition_solution(347, 285) == "7+5+0=12 4+8+1=13 3+2+1=6 ans=632"
    assert addition_steps(95, 7) == ["5+7+0=12", "9+0+1=10"]  # unequal lengths, final carry
    assert count_carries(347, 285) == 2 and count_carries(12, 34) == 0


def test_addition_generator_digits_and_answers():
    rng = random.Random(0)
    for d in (1, 2, 3, 4):
        for _ in range(50):
            r = make_problem(rng, d)
            a, b = r["a"], r["b"]
            assert len(str(a)) == d and len(str(b)) == d
            assert r["answer"] == str(a + b) and r["prompt"] == f"{a}+{b}"
            assert AdditionVerifier(require_steps=True).score(r["solution"], r["answer"], r).reward == 1.0
    r = make_problem(rng, 3, min_carries=3)
    assert r["carries"] == 3
    for _ in range(30):  # the carries knob: independent count from the digits themselves
        r = make_problem(rng, 3, max_carries=0)
        assert all(int(x) + int(y) <= 9 for x, y in zip(str(r["a"]), str(r["b"])))
        r = make_problem(rng, 2, min_carries=1)
        assert any(int(x) + int(y) >= 9 for x, y in zip(str(r["a"]), str(r["b"])))
    split = make_split(40, [3], seed=5)
    assert len({x["prompt"] for x in split}) == 40 and split == make_split(40, [3], seed=5)
    ev = make_split(40, [3], seed=6, exclude={x["prompt"] for x in split})
    assert not ({x["prompt"] for x in ev} & {x["prompt"] for x in split})


def _carry_ins_by_hand(a: int, b: int) -> int:
    """Columns that receive a carry, by grade-school addition on the digit lists."""
    da, db = [int(c) for c in str(a)[::-1]], [int(c) for c in str(b)[::-1]]
    carry, received = 0, 0
    for i in range(max(len(da), len(db))):
        received += carry
        s = (da[i] if i < len(da) else 0) + (db[i] if i < len(db) else 0) + carry
        carry = 1 if s >= 10 else 0
    return received


def test_carry_ins_knob_and_per_digit_bounds():
    # 347+285: carries out of columns 1 and 2, received by columns 2 and 3; 73+52: only the top column carries
    assert count_carry_ins(347, 285) == 2 and count_carry_ins(73, 52) == 0 and count_carries(73, 52) == 1
    assert count_carry_ins(999, 1) == 2 and count_carry_ins(7, 5) == 0
    rng = random.Random(1)
    for _ in range(200):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        assert count_carry_ins(a, b) == _carry_ins_by_hand(a, b)
    # the "compose" split of the tiny example: 1-2 digits unbounded, 3 digits without a received carry
    easy = make_split(90, [1, 2, 3], seed=3, max_carries={3: 0}, carry_kind="carry_ins")
    three = [r for r in easy if r["digits"] == 3]
    assert len(three) == 30 and all(_carry_ins_by_hand(r["a"], r["b"]) == 0 for r in three)
    assert any(r["carries"] == 1 for r in three)  # a carry out of the top column is allowed
    assert any(_carry_ins_by_hand(r["a"], r["b"]) > 0 for r in easy if r["digits"] == 2)
    hard = make_split(30, [3], seed=4, min_carries=1, carry_kind="carry_ins")
    assert all(_carry_ins_by_hand(r["a"], r["b"]) >= 1 for r in hard)
    with pytest.raises(ValueError, match="carry_kind"):
        make_problem(rng, 2, carry_kind="borrows")


def test_addition_verifier_messages():
    v = AdditionVerifier()
    rec = {"prompt": "347+285", "answer": "632"}
    assert v.score("7+5+0=12 4+8+1=13 3+2+1=6 ans=632", "632", rec) == RewardResult(1.0, "")
    r = v.score("7+5+0=12 4+8+1=12 3+2+1=6 ans=622", "632", rec)
    assert r.reward == 0.0
    assert r.message == "final answer wrong; first wrong step: the tens column (wrong sum)"
    r = v.score("7+5+0=12 4+8+0=12 3+2+1=6 ans=622", "632", rec)
    assert r.message == "final answer wrong; first wrong step: the tens column (wrong carry)"
    r = v.score("7+5+0=12 5+8+1=14 3+2+1=6 ans=642", "632", rec)
    assert r.message == "final answer wrong; first wrong step: the tens column (wrong digits)"
    r = v.score("7+5+0=12 4+8+1=13 ans=32", "632", rec)
    assert r == RewardResult(0.0, "final answer wrong; the hundreds column step is missing")
    r = v.score("7+5+0=12 4+8+1=13 3+2+1=6 0+0+0=0 ans=6320", "632", rec)
    assert r.message == "final answer wrong; extra step after the hundreds column"
    r = v.score("7+5+0=12 4+8+1=13 3+2+1=6 ans=633", "632", rec)
    assert r.message == "final answer wrong; every column step is right, ans= does not follow from them"
    assert v.score("ans=633", "633", {"answer": "633"}) == RewardResult(1.0, "")
    assert v.score("ans=634", "633", {"answer": "633"}) == RewardResult(0.0, "final answer wrong")  # no operands
    r = v.score("blah", "632", rec)
    assert r.reward == 0.0 and r.message.startswith("unparsable")
    # right answer with wrong steps: rewarded unless require_steps
    bad_steps = "7+5+0=11 4+8+1=13 3+2+1=6 ans=632"
    assert v.score(bad_steps, "632", rec).reward == 1.0
    r = AdditionVerifier(require_steps=True).score(bad_steps, "632", rec)
    assert r == RewardResult(0.0, "answer right but steps wrong; first wrong step: the ones column (wrong sum)")
    # the last ans= counts
    assert v.score("ans=1 ... ans=632", "632", rec).reward == 1.0


def test_exact_match():
    v = ExactMatchVerifier()
    assert last_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_answer("work\n#### 42") == "42"
    assert extract_answer("The answer is 7.") == "7."
    assert v.score(r"thus \boxed{Paris}.", "paris", {}).reward == 1.0
    assert v.score("The answer is: 42.", "42", {}).reward == 1.0
    r = v.score(r"\boxed{41}", "42", {})
    assert r == RewardResult(0.0, "extracted answer '41' is wrong")
    # a quote of the response's own text that contains the answer is dropped, never the answer shown
    assert v.score(r"\boxed{420}", "42", {}) == RewardResult(0.0, "the extracted answer is wrong")
    assert ExactMatchVerifier(lowercase=False).score(r"\boxed{paris}", "Paris", {}).reward == 0.0
    r = v.score("x = 1\nx = 3\n\\boxed{3}", "2", {"solution": "x = 1\nx = 2\n2"})
    assert r.message == "extracted answer '3' is wrong; first step differing from the reference: step 2 ('x = 3')"
    r = v.score("x = 1\nx = 2\nso x is 5\n\\boxed{5}", "2", {"solution": "x = 1\nx = 2\nx is 2\n2"})
    assert r.message == "extracted answer '5' is wrong; first step differing from the reference: step 3 ('so x is 5')"
    r = v.score("x = 1\ny = 12\n\\boxed{5}", "12", {"solution": "x = 1\nx = 12\n12"})
    assert r.message == "extracted answer '5' is wrong; first step differing from the reference: step 2"
    assert v.score("", "1", {}).message.startswith("unparsable")


@pytest.fixture(scope="module")
def math_verifier():
    v = get_reward_fn("math", num_workers=1, timeout_s=30)
    yield v
    v.close()


def test_math_verify_equivalences(math_verifier):
    cases = [
        (r"The answer is $\boxed{0.5}$.", "1/2", 1.0),
        (r"$\frac{1}{2}$", "0.5", 1.0),
        (r"We get \boxed{\frac{2}{4}}", r"\frac{1}{2}", 1.0),
        (r"so $x = \boxed{3}$", "3", 1.0),
        (r"\boxed{0.4}", "1/2", 0.0),
        ("I have no idea", "4", 0.0),
    ]
    res = math_verifier.score_batch([(r, a, {}) for r, a, _ in cases])
    assert [x.reward for x in res] == [c[2] for c in cases]
    assert res[4].message == "extracted answer '0.4' is wrong"  # never the expected answer
    assert res[5].message.startswith("unparsable")
    assert res[0].message == ""
    # single-item API and score_many go through the same pool
    assert math_verifier.score(r"\boxed{2}", "2", {}).reward == 1.0
    assert [x.reward for x in score_many(math_verifier, [(r"\boxed{7}", "7", {})])] == [1.0]


def test_registry_and_score_many_callables():
    assert isinstance(get_reward_fn("exact_match"), ExactMatchVerifier)
    assert isinstance(get_reward_fn("arithmetic"), AdditionVerifier)
    with pytest.raises(ValueError, match="'data.reward_fn': 'mathh' is not one of .*exact_match.*did you mean 'math'"):
        get_reward_fn("mathh")
    out = score_many(lambda r, a, rec: (1.0 if r == a else 0.0, "m"), [("1", "1", {}), ("2", "1", {})])
    assert out == [RewardResult(1.0, "m"), RewardResult(0.0, "m")]
    assert score_many(lambda r, a, rec: 0.5, [("x", "y", {})]) == [RewardResult(0.5, "")]
