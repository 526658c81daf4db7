"""Verifier protocol: `score(response_text, answer, record) -> RewardResult(reward, message)`.

Every verifier returns a scalar reward and a short error message (empty when correct). The message is
what the fix stage's `error_info` variant shows the policy: unparsable output, the extracted vs the
expected answer, and the first wrong step when the data has a step-by-step `solution`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class RewardResult:
    """Scalar reward and a short, human-readable error message ("" when the response is correct)."""

    reward: float
    message: str = ""


@runtime_checkable
class Verifier(Protocol):
    """Anything with `score`; `score_batch` is optional (process-pool verifiers implement it)."""

    def score(self, response_text: str, answer: str, record: dict[str, Any]) -> RewardResult: ...


ScoreItem = tuple[str, str, dict]  # (response_text, answer, record)


def score_many(verifier: Any, items: Sequence[ScoreItem]) -> list[RewardResult]:
    """Score `items` with `verifier.score_batch` when it has one, else one `score` call per item.

    A plain callable `f(response_text, answer, record)` returning a RewardResult, a float, or a
    (reward, message) tuple is accepted too.
    """
    if hasattr(verifier, "score_batch"):
        return list(verifier.score_batch(list(items)))
    fn = verifier.score if hasattr(verifier, "score") else verifier
    return [as_result(fn(r, a, rec)) for r, a, rec in items]


def as_result(value: Any) -> RewardResult:
    """Normalise a RewardResult / float / (reward, message) into a RewardResult."""
    if isinstance(value, RewardResult):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return RewardResult(float(value[0]), str(value[1]))
    return RewardResult(float(value), "")


def clip_text(text: str, limit: int = 60) -> str:
    """Single-line, length-limited rendering of `text` for error messages."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_steps(text: str) -> list[str]:
    """Split a step-by-step solution into non-empty, whitespace-normalised steps (lines, or ';')."""
    parts = re.split(r"\n|;", text)
    return [" ".join(p.split()) for p in parts if p.strip()]


def first_divergent_step(response_text: str, solution: str) -> str:
    """Generic first-wrong-step locator against a reference `solution` ("" if none found).

    Steps are lines (or ';'-separated). Returns e.g. "first step differing from the reference: step 2
    ('x = 3')". Task verifiers with real step semantics (see `addition.py`) do better.
    """
    ref, got = split_steps(solution), split_steps(response_text)
    if len(ref) < 2:
        return ""
    for i, step in enumerate(ref):
        if i >= len(got):
            return f"solution stops after step {i} of {len(ref)}"
        if got[i] != step:
            return f"first step differing from the reference: step {i + 1} ('{clip_text(got[i], 40)}')"
    return ""
