"""Verifier protocol: `score(response_text, answer, record) -> RewardResult(reward, message)`.

Every verifier returns a scalar reward and a short error message (empty when correct). The message is
what the fix stage's `error_info` variant shows the policy: unparsable output, that (and which) extracted
answer is wrong, and the first wrong step when the data has a step-by-step `solution` or the task has step
semantics. A message never contains the reference answer: the answer reaches a fix prompt only through the
`{reference}`/`{solution}` template fields, so `error_info` measures feedback, not answer copying.
Quote the response's own text with `safe_quote`, which drops a quote that contains the answer.
"""
from __future__ import annotations

import re
import threading
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


# Verifiers are not thread-safe (a ProcessPool's workers, a client's session); under trainer.async_mode the rollout
# producer thread and the trainer's eval both score, so every score_many call holds this lock.
_SCORE_LOCK = threading.RLock()


def score_many(verifier: Any, items: Sequence[ScoreItem]) -> list[RewardResult]:
    """Score `items` with `verifier.score_batch` when it has one, else one `score` call per item (one call at a
    time per process: `_SCORE_LOCK`).

    A plain callable `f(response_text, answer, record)` returning a RewardResult, a float, or a
    (reward, message) tuple is accepted too.
    """
    with _SCORE_LOCK:
        if hasattr(verifier, "score_batch"):
            return list(verifier.score_batch(list(items)))
        fn = verifier.score if hasattr(verifier, "score") else verifier
        return [as_result(fn(r, a, rec)) for r, a, rec in items]


class OutcomeScorer:
    """Mixin for verifiers whose ``score_outcomes(items)`` returns one RewardResult or exception per item
    (errors kept per item for rewards.guard): ``score_batch`` raises the first exception, ``score`` is one item."""

    def score_outcomes(self, items: Sequence[ScoreItem]) -> list:  # pragma: no cover - provided by the class
        raise NotImplementedError

    def score_batch(self, items: Sequence[ScoreItem]) -> list[RewardResult]:
        outs = self.score_outcomes(items)
        for o in outs:
            if isinstance(o, BaseException):
                raise o
        return outs

    def score(self, response_text: str, answer: str, record: dict[str, Any]) -> RewardResult:
        return self.score_batch([(response_text, answer, record)])[0]


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


def safe_quote(text: str, answer: str, limit: int = 30) -> str:
    """`'text'` (single-line, clipped to `limit`) for a message, or "" when the clipped text contains the
    reference `answer` (case- and whitespace-insensitive), so a message never carries the answer even when
    the response's own text does (e.g. a near miss "6320" for "632", or a right intermediate step)."""
    shown = clip_text(text, limit)
    ref = " ".join(str(answer).split()).lower()
    if ref and ref in " ".join(shown.split()).lower():
        return ""
    return f"'{shown}'"


def split_steps(text: str) -> list[str]:
    """Split a step-by-step solution into non-empty, whitespace-normalised steps (lines, or ';')."""
    parts = re.split(r"\n|;", text)
    return [" ".join(p.split()) for p in parts if p.strip()]


def first_divergent_step(response_text: str, solution: str, answer: str = "") -> str:
    """Generic first-wrong-step locator against a reference `solution` ("" if none found).

    Steps are lines (or ';'-separated). Returns e.g. "first step differing from the reference: step 2
    ('x = 3')" — the response's step, never the reference's; the quote is dropped when it contains
    `answer` (see `safe_quote`). Task verifiers with real step semantics (see `addition.py`) do better.
    """
    ref, got = split_steps(solution), split_steps(response_text)
    if len(ref) < 2:
        return ""
    for i, step in enumerate(ref):
        if i >= len(got):
            return f"solution stops after step {i} of {len(ref)}"
        if got[i] != step:
            quote = safe_quote(got[i], answer, 40)
            return f"first step differing from the reference: step {i + 1}" + (f" ({quote})" if quote else "")
    return ""
