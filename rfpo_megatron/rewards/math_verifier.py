"""Math verifier on `math-verify`, run in worker processes (its timeouts use SIGALRM, not thread-safe).

reward = 1.0 when the gold answer and the response's extracted answer are equivalent (1/2 == 0.5,
\\boxed{...}, LaTeX vs plain), else 0.0. The message says: unparsable, or which extracted answer is wrong,
plus the first step that differs from the record's `solution` when it has one; it never contains the
reference answer (`base.safe_quote`).
"""
from __future__ import annotations

from typing import Any, Sequence

from rfpo_megatron.rewards.base import RewardResult, ScoreItem, first_divergent_step, safe_quote
from rfpo_megatron.rewards.pool import ProcessPool


def _gold_text(answer: str) -> str:
    """Wrap a bare gold answer in $...$ so math-verify's LaTeX extractor sees it."""
    a = str(answer).strip()
    return a if ("$" in a or "\\boxed" in a) else f"${a}$"


def _import_math_verify() -> None:
    """Worker initializer: pay math-verify's import cost before the first timed item."""
    import math_verify  # noqa: F401


def math_verify_one(response_text: str, answer: str, parse_timeout: int = 5) -> tuple[float, str]:
    """Score one response with math-verify in THIS process (main thread). Returns (reward, message)."""
    from math_verify import parse, verify

    gold = parse(_gold_text(answer), parsing_timeout=parse_timeout)
    if not gold:
        return 0.0, "the reference answer could not be parsed (a data error, not the response's)"
    pred = parse(response_text, parsing_timeout=parse_timeout)
    if not pred:
        return 0.0, "unparsable: no final answer found (put it in \\boxed{...})"
    if verify(gold, pred, timeout_seconds=parse_timeout):
        return 1.0, ""
    got = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    quote = safe_quote(got, answer)
    return 0.0, (f"extracted answer {quote} is wrong" if quote else "the extracted answer is wrong")


class MathVerifier:
    """math-verify in a `ProcessPool`; `score_batch` parallelises, a timed-out item scores 0."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, parse_timeout: int = 5):
        self.parse_timeout = int(parse_timeout)
        self.pool = ProcessPool(math_verify_one, num_workers=num_workers, timeout_s=timeout_s,
                                initializer=_import_math_verify)

    def score(self, response_text: str, answer: str, record: dict[str, Any]) -> RewardResult:
        return self.score_batch([(response_text, answer, record)])[0]

    def score_batch(self, items: Sequence[ScoreItem]) -> list[RewardResult]:
        """items: [(response_text, answer, record)] -> one RewardResult each, in order."""
        outs = self.pool.map([(r, str(a), self.parse_timeout) for r, a, _ in items])
        results = []
        for (resp, ans, rec), out in zip(items, outs):
            if not out.ok:
                results.append(RewardResult(0.0, f"verifier failed: {out.error}"))
                continue
            reward, msg = out.value
            if reward <= 0 and isinstance(rec, dict) and rec.get("solution"):
                step = first_divergent_step(resp, str(rec["solution"]), str(ans))
                msg = f"{msg}; {step}" if step else msg
            results.append(RewardResult(float(reward), msg))
        return results

    def close(self) -> None:
        self.pool.close()
