"""Console progress: one line per step with percent, seconds/step, ETA and a few headline metrics."""
from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

# Metrics shown on the progress line when present (short label, key).
HEADLINE = (
    ("reward", "rollout/reward_mean"),
    ("zero", "rfpo/zero_group_frac"),
    ("fix_ok", "rfpo/fix_success_rate"),
    ("loss", "train/loss"),
    ("tok/s", "perf/tokens_per_s"),
)


def format_duration(seconds: float) -> str:
    """`3h02m`, `4m05s`, `12s` (never negative)."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _bar(frac: float, width: int = 20) -> str:
    filled = int(round(frac * width))
    return "#" * filled + "." * (width - filled)


class ProgressBar:
    """Prints `[####......] step 3/20 15% | 12.3s/step | ETA 3m29s | reward 0.41 ...` after each step.

    The ETA uses the mean duration of the steps run in this process (resumed steps are not counted).
    """

    def __init__(self, total: int, start_step: int = 0, stream: Optional[TextIO] = None, enabled: bool = True):
        self.total = int(total)
        self.start_step = int(start_step)
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self._t0 = time.monotonic()

    def eta_seconds(self, step: int, now: Optional[float] = None) -> float:
        """Seconds left after `step` of `total` at this process's mean step time."""
        now = time.monotonic() if now is None else now
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (now - self._t0) / done * max(0, self.total - step)

    def line(self, step: int, metrics: dict[str, Any], now: Optional[float] = None) -> str:
        now = time.monotonic() if now is None else now
        done = step - self.start_step
        frac = step / self.total if self.total else 1.0
        per = (now - self._t0) / done if done > 0 else float("nan")
        eta = self.eta_seconds(step, now)
        parts = [f"[{_bar(frac)}] step {step}/{self.total} {100 * frac:3.0f}%"]
        if per == per:
            parts.append(f"{per:.1f}s/step")
            parts.append(f"ETA {format_duration(eta)}")
        for label, key in HEADLINE:
            v = metrics.get(key)
            if isinstance(v, (int, float)) and v == v:
                parts.append(f"{label} {v:.3g}")
        return " | ".join(parts)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if self.enabled:
            print(self.line(step, metrics), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)
