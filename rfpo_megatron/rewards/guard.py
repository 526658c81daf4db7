"""The error policy around every reward function (built-in, by path, or remote): `data.reward_error_policy`.

`GuardedReward(inner, name, policy)` scores a batch and checks each item: a reward function that raises, returns
something that is not a reward, or a non-finite reward is an error naming the function and the record id, e.g.
    data.reward_fn 'my_rewards.py:score' failed on record 'q17': ZeroDivisionError: division by zero
policy `raise` raises it (`RewardError`, one line; the step fails); policy `zero` scores that item 0.0 with the
message `ERROR_MESSAGE` and counts it (`pop_errors()` -> the trainer's `rollout/reward_errors`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from rfpo_megatron.rewards.base import RewardResult, ScoreItem
from rfpo_megatron.rewards.custom import Outcome, one_line, to_result

ERROR_MESSAGE = "the verifier could not score this response"
POLICIES = ("raise", "zero")


class RewardError(RuntimeError):
    """A reward function failed on a record (one line: function, record id, what happened)."""


def outcomes_of(inner: Any, items: Sequence[ScoreItem]) -> list[Outcome]:
    """Per-item RewardResult-or-exception from any verifier: `score_outcomes` when it has one, else
    `score_batch` (a raise fails the whole batch), else one `score`/call per item."""
    items = list(items)
    if hasattr(inner, "score_outcomes"):
        return list(inner.score_outcomes(items))
    if hasattr(inner, "score_batch"):
        try:
            out = list(inner.score_batch(items))
        except Exception as exc:
            return [exc] * len(items)
        if len(out) != len(items):
            return [ValueError(f"returned {len(out)} results for a batch of {len(items)}")] * len(items)
        return [_checked(o) for o in out]
    fn = inner.score if hasattr(inner, "score") else inner
    outs: list[Outcome] = []
    for r, a, rec in items:
        try:
            outs.append(to_result(fn(r, a, rec)))
        except Exception as exc:
            outs.append(exc)
    return outs


def _checked(value: Any) -> Outcome:
    try:
        res = to_result(value)
    except Exception as exc:
        return exc
    return res if math.isfinite(res.reward) else ValueError(f"returned a non-finite reward ({res.reward})")


@dataclass
class GuardedReward:
    """`inner` under the error policy; the verifier object the trainer, the fix stage and eval score with."""

    inner: Any
    name: str
    policy: str = "raise"
    field: str = "data.reward_fn"
    errors: int = 0  # items zero-scored since the last pop_errors()

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"reward error policy '{self.policy}' is not one of {list(POLICIES)}")

    def score_batch(self, items: Sequence[ScoreItem]) -> list[RewardResult]:
        items = list(items)
        out: list[RewardResult] = []
        outs = outcomes_of(self.inner, items)
        for (_, _, rec), o in zip(items, outs):
            if isinstance(o, BaseException):
                rid = rec.get("id", "?") if isinstance(rec, dict) else "?"
                what = str(o) if isinstance(o, RewardError) else one_line(o)
                msg = f"{self.field} '{self.name}' failed on record '{rid}': {what}"
                if len(items) > 1 and all(x is o for x in outs):
                    msg += f" (the whole batch of {len(items)} failed)"
                if self.policy == "raise":
                    raise RewardError(msg) from (o if isinstance(o, Exception) else None)
                self.errors += 1
                out.append(RewardResult(0.0, ERROR_MESSAGE))
            else:
                out.append(o)
        return out

    def score(self, response_text: str, answer: str, record: dict[str, Any]) -> RewardResult:
        return self.score_batch([(response_text, answer, record)])[0]

    def pop_errors(self) -> int:
        """Items zero-scored (policy zero) since the last call; resets the count."""
        n, self.errors = self.errors, 0
        return n

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()

