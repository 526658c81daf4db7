"""Exact-match verifier: extract the final answer (\\boxed{}, '####', 'answer is', last line) and compare.

Normalisation: strip whitespace, surrounding $ and a trailing period, collapse inner spaces, and
(optionally) lowercase. reward 1.0 on a match, else 0.0 with a message naming the extracted (wrong) answer;
the message never contains the reference answer (`base.safe_quote`).
"""
from __future__ import annotations

import re
from typing import Any

from rfpo_megatron.rewards.base import RewardResult, first_divergent_step, safe_quote


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """Final answer string from a response, or None when nothing answer-like is there."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    m = re.findall(r"####\s*(.+)", text)
    if m:
        return m[-1]
    m = re.findall(r"answer(?:\s+is)?\s*:?\s*(.+)", text, flags=re.IGNORECASE)
    if m:
        return m[-1]
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


def normalize(s: str, lowercase: bool = True) -> str:
    """Whitespace-collapsed, $- and trailing-period-stripped (optionally lowercased) answer string."""
    s = " ".join(str(s).split()).strip().strip("$").strip()
    s = s.rstrip(".").strip()
    return s.lower() if lowercase else s


class ExactMatchVerifier:
    """reward 1.0 iff normalize(extract_answer(response)) == normalize(answer)."""

    def __init__(self, lowercase: bool = True):
        self.lowercase = lowercase

    def score(self, response_text: str, answer: str, record: dict[str, Any]) -> RewardResult:
        got = extract_answer(response_text)
        if got is None:
            return RewardResult(0.0, "unparsable: empty response")
        if normalize(got, self.lowercase) == normalize(answer, self.lowercase):
            return RewardResult(1.0, "")
        quote = safe_quote(got, answer)
        msg = f"extracted answer {quote} is wrong" if quote else "the extracted answer is wrong"
        if isinstance(record, dict) and record.get("solution"):
            step = first_divergent_step(response_text, str(record["solution"]), str(answer))
            msg = f"{msg}; {step}" if step else msg
        return RewardResult(0.0, msg)
