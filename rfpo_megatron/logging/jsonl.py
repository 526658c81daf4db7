"""JSONL metrics file: one JSON object per logged step, appended and flushed, readable back with `read_metrics`."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional


def _clean(value: Any) -> Any:
    """Make a metric value JSON-safe: tensors/numpy scalars -> float, NaN/inf -> None."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value
    if isinstance(value, str):
        return value
    return None


class JsonlWriter:
    """Appends `{"step": s, "time": t, **metrics}` lines to `path` (the directory is created).

    On resume, `truncate_after(step)` drops lines with a step greater than the resumed checkpoint's step,
    so the file never holds two records for the same step.
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")

    def truncate_after(self, step: int) -> int:
        """Drop records with `step > step`; returns how many were dropped."""
        self._fh.close()
        records = read_metrics(self.path) if os.path.exists(self.path) else []
        keep = [r for r in records if int(r.get("step", 0)) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in keep:
                fh.write(json.dumps(r, sort_keys=True) + "\n")
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        return len(records) - len(keep)

    def write(self, step: int, metrics: dict[str, Any], wall_time: Optional[float] = None) -> None:
        rec = {k: _clean(v) for k, v in metrics.items()}
        rec["step"] = int(step)
        if wall_time is not None:
            rec["time"] = float(wall_time)
        self._fh.write(json.dumps(rec, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file, in order. A torn last line (killed mid-write) is skipped."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
