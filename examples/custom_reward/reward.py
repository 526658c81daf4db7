"""A user reward function outside the package: column-addition answers, with an actionable message.

Signature (the package's reward call): score(response_text, answer, record) -> (reward, message). The message
is what the RFPO `error_info` fix variant shows the policy ({error}), so it says WHAT is wrong without the
expected answer.
"""
from __future__ import annotations

import re

_ANS = re.compile(r"ans=(-?\d+)")
_STEP = re.compile(r"(\d+)\+(\d+)\+(\d+)=(\d+)")


def score(response_text: str, answer: str, record: dict) -> tuple[float, str]:
    """1.0 when the last `ans=` equals the answer and every column step `a+b+c=s` adds up, else 0.0 + why."""
    finals = _ANS.findall(response_text)
    if not finals:
        return 0.0, "no final answer: end with ans=<number>"
    for k, (a, b, c, s) in enumerate(_STEP.findall(response_text), start=1):
        if int(a) + int(b) + int(c) != int(s):
            return 0.0, f"column step {k} ({a}+{b}+{c}={s}) does not add up"
    if finals[-1].lstrip("0") != str(answer).strip().lstrip("0"):
        return 0.0, "the column steps are right but ans= does not follow from them"
    return 1.0, ""
