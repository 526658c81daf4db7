"""Synthetic task: multi-digit addition written step by step (digit by digit with carries).

Difficulty knobs: number of digits per operand and the number of carries (made or received). The RFPO demo
(examples/tiny_cpu, split `compose`) warm-starts a tiny model on 1-2 digit sums and carry-free 3-digit sums;
3-digit sums with a carry are its hard split.

Format (prompt "347+285"), right-to-left columns "a+b+carry=sum", then the answer:
    7+5+0=12 4+8+1=13 3+2+1=6 ans=632
The verifier checks the final `ans=` and locates the first wrong column step and what is wrong in it
(digits, carry, sum), without showing the expected answer.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
from typing import Any

from rfpo_megatron.rewards.base import RewardResult

_STEP = re.compile(r"(\d)\+(\d)\+(\d)=(\d+)")
_ANS = re.compile(r"ans\s*=\s*(-?\d+)")
_OPS = re.compile(r"(\d+)\s*\+\s*(\d+)")


def addition_steps(a: int, b: int) -> list[str]:
    """Column steps "da+db+c=s" from the least significant digit; one step per digit of max(a, b)."""
    sa, sb = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(sa), len(sb))):
        da = int(sa[i]) if i < len(sa) else 0
        db = int(sb[i]) if i < len(sb) else 0
        s = da + db + carry
        steps.append(f"{da}+{db}+{carry}={s}")
        carry = s // 10
    return steps


def addition_solution(a: int, b: int) -> str:
    """Full reference response: steps then "ans=<a+b>"."""
    return " ".join(addition_steps(a, b) + [f"ans={a + b}"])


def count_carries(a: int, b: int) -> int:
    """Number of columns that produce a carry."""
    return sum(1 for st in addition_steps(a, b) if int(st.split("=")[1]) >= 10)


def count_carry_ins(a: int, b: int) -> int:
    """Number of columns that receive a carry ("+1" steps); a carry out of the top column is not one."""
    return sum(1 for st in addition_steps(a, b) if st.split("=")[0].endswith("+1"))


CARRY_COUNTS = {"carries": count_carries, "carry_ins": count_carry_ins}


def make_problem(rng: random.Random, digits: int, min_carries: int = 0, pid: str = "",
                 max_carries: int | None = None, carry_kind: str = "carries") -> dict[str, Any]:
    """One record {id, prompt, answer, solution, digits, carries, a, b} with `digits`-digit operands
    and min_carries <= count <= max_carries, count = `carry_kind` ("carries": columns producing a carry;
    "carry_ins": columns receiving one, so a sum >= 10 in the top column alone counts 0)."""
    if carry_kind not in CARRY_COUNTS:
        raise ValueError(f"carry_kind={carry_kind!r}: expected one of {sorted(CARRY_COUNTS)}")
    count = CARRY_COUNTS[carry_kind]
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    top = digits if max_carries is None else max_carries
    for _ in range(10_000):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if min_carries <= count(a, b) <= top:
            break
    else:
        raise ValueError(f"no {digits}-digit problem with {min_carries}..{top} {carry_kind}")
    return {"id": pid or f"add{digits}-{a}+{b}", "prompt": f"{a}+{b}", "answer": str(a + b),
            "solution": addition_solution(a, b), "digits": digits, "carries": count_carries(a, b),
            "a": a, "b": b}


def make_split(n: int, digits: list[int], seed: int, min_carries: int = 0, prefix: str = "",
               exclude: set[str] | None = None, max_carries: int | dict[int, int] | None = None,
               carry_kind: str = "carries") -> list[dict]:
    """`n` distinct problems, digit counts cycling through `digits`, deterministic in `seed`.

    `max_carries` may be a {digits: max} dict (digit counts it does not name are unbounded).

    Prompts in `exclude` (e.g. the train split's) are skipped while distinct ones can still be found.
    """
    rng, out, seen = random.Random(seed), [], set(exclude or ())
    tries = 0
    while len(out) < n:
        d = digits[len(out) % len(digits)]
        top = max_carries.get(d) if isinstance(max_carries, dict) else max_carries
        rec = make_problem(rng, d, min_carries, max_carries=top, carry_kind=carry_kind)
        tries += 1
        if rec["prompt"] in seen and tries < 50 * n:
            continue
        seen.add(rec["prompt"])
        rec["id"] = f"{prefix}{len(out)}"
        out.append(rec)
    return out


def _operands(record: dict[str, Any]) -> tuple[int, int] | None:
    if "a" in record and "b" in record:
        return int(record["a"]), int(record["b"])
    m = _OPS.search(str(record.get("prompt", "")))
    return (int(m.group(1)), int(m.group(2))) if m else None


COLUMN_NAMES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions",
                "ten-millions", "hundred-millions", "billions", "ten-billions", "hundred-billions")


def column_name(i: int) -> str:
    """Name of column `i` (0 = ones) for messages, in words (a digit in a message could be an answer's)."""
    return COLUMN_NAMES[i] if i < len(COLUMN_NAMES) else f"column {i + 1} from the right"


def step_problems(got: tuple[int, int, int, int], want: tuple[int, int, int, int]) -> list[str]:
    """What is wrong with a column step a+b+c=s against the right one, without any right value:
    "wrong digits" (a, b are not the operands' digits of that column), "wrong carry" (c), "wrong sum"
    (s != a + b + c, i.e. an arithmetic slip in the step's own terms)."""
    out = []
    if got[:2] != want[:2]:
        out.append("wrong digits")
    if got[2] != want[2]:
        out.append("wrong carry")
    if got[3] != got[0] + got[1] + got[2]:
        out.append("wrong sum")
    return out


def locate_step_error(response_text: str, a: int, b: int) -> str:
    """The first wrong / missing / extra column step of `response_text` for a+b ("" when all are right).

    Names the column in words and what is wrong in it (`step_problems`); quotes no value, so the message
    carries no digit of the answer (or of any right step)."""
    want = [tuple(int(x) for x in re.split(r"[+=]", st)) for st in addition_steps(a, b)]
    got = [tuple(int(x) for x in m) for m in _STEP.findall(response_text)]
    for i, w in enumerate(want):
        if i >= len(got):
            return f"the {column_name(i)} column step is missing"
        if got[i] != w:
            return f"first wrong step: the {column_name(i)} column ({', '.join(step_problems(got[i], w))})"
    if len(got) > len(want):
        return f"extra step after the {column_name(len(want) - 1)} column"
    return ""


class AdditionVerifier:
    """reward 1.0 iff the final `ans=` equals the answer (and, with require_steps, every step is right).

    The message says whether `ans=` is missing, wrong, or right with wrong steps, and locates the first
    wrong (missing, extra) column step and what is wrong in it. It never shows the expected answer or a
    right step (the answer reaches a fix prompt only through `{reference}`/`{solution}`), e.g.
        "final answer wrong; first wrong step: the tens column (wrong sum)"
        "final answer wrong; every column step is right, ans= does not follow from them"
    """

    def __init__(self, require_steps: bool = False):
        self.require_steps = require_steps

    def score(self, response_text: str, answer: str, record: dict[str, Any]) -> RewardResult:
        finals = _ANS.findall(response_text)
        ops = _operands(record or {})
        step_msg = locate_step_error(response_text, *ops) if ops is not None else ""
        if not finals:
            return RewardResult(0.0, "unparsable: no 'ans=<number>'" + (f"; {step_msg}" if step_msg else ""))
        final = finals[-1]
        ok = final.lstrip("0") == str(answer).strip().lstrip("0")
        if ok and not (self.require_steps and step_msg):
            return RewardResult(1.0, "")
        if ok:
            return RewardResult(0.0, f"answer right but steps wrong; {step_msg}")
        if not step_msg and ops is not None:
            step_msg = "every column step is right, ans= does not follow from them"
        return RewardResult(0.0, "final answer wrong" + (f"; {step_msg}" if step_msg else ""))


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write records as one JSON object per line (creates the directory)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _digits_arg(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    """CLI: write train/eval jsonl splits (easy and hard) for the addition task."""
    p = argparse.ArgumentParser(description="generate addition-task jsonl splits")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--easy-digits", type=_digits_arg, default=[1, 2])
    p.add_argument("--hard-digits", type=_digits_arg, default=[3])
    p.add_argument("--n-train-easy", type=int, default=256)
    p.add_argument("--n-train-hard", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=128)
    p.add_argument("--min-carries-hard", type=int, default=0)
    p.add_argument("--max-carries-easy", type=int, default=None)
    p.add_argument("--carry-kind", choices=sorted(CARRY_COUNTS), default="carries",
                   help="what --min-carries-hard/--max-carries-easy count: carries made, or carries received")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = write_splits(a.out, a.easy_digits, a.hard_digits, a.n_train_easy, a.n_train_hard,
                          a.n_eval, a.min_carries_hard, a.seed, a.max_carries_easy, a.carry_kind)
    for name, recs in splits.items():
        print(f"wrote {len(recs):5d} records -> {os.path.join(a.out, name + '.jsonl')}")
    return 0


def write_splits(out: str, easy_digits: list[int], hard_digits: list[int], n_train_easy: int,
                 n_train_hard: int, n_eval: int, min_carries_hard: int = 0, seed: int = 0,
                 max_carries_easy: int | dict[int, int] | None = None, carry_kind: str = "carries") -> dict:
    """Write train_easy/train_hard/eval_easy/eval_hard.jsonl into `out`; eval avoids train prompts.

    Difficulty = digits (easy_digits vs hard_digits) and/or carries (max_carries_easy, min_carries_hard,
    counted as `carry_kind`, see make_problem).
    """
    kw = dict(carry_kind=carry_kind)
    tr_e = make_split(n_train_easy, easy_digits, seed + 1, prefix="te", max_carries=max_carries_easy, **kw)
    tr_h = make_split(n_train_hard, hard_digits, seed + 2, min_carries_hard, "th", **kw)
    splits = {
        "train_easy": tr_e,
        "train_hard": tr_h,
        "eval_easy": make_split(n_eval, easy_digits, seed + 3, prefix="ee",
                                exclude={r["prompt"] for r in tr_e}, max_carries=max_carries_easy, **kw),
        "eval_hard": make_split(n_eval, hard_digits, seed + 4, min_carries_hard, "eh",
                                exclude={r["prompt"] for r in tr_h}, **kw),
    }
    for name, recs in splits.items():
        write_jsonl(os.path.join(out, f"{name}.jsonl"), recs)
    return splits


if __name__ == "__main__":
    raise SystemExit(main())
