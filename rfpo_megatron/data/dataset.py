"""Prompt sets from jsonl/parquet: records with `prompt`, `answer`, optional `solution`, `hints`, `id`.

A malformed record raises `DataError("<file>:<line>: field '<name>' ...")` unless
`skip_bad_records=True`, which drops it and logs how many were skipped. `prompt` is a string or a
list of chat messages ({"role", "content"}); `answer` may be a number (stored as its string).
Extra fields are kept (verifiers may use them).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A user data problem; the message names file:line and the field."""


@dataclass
class PromptSet:
    """Validated records of one file; `num_skipped` bad records were dropped (skip_bad_records)."""

    path: str
    records: list[dict[str, Any]] = field(default_factory=list)
    num_skipped: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.records[i]


def _iter_raw(path: str) -> Iterator[tuple[int, Any, str]]:
    """Yield (line_or_row_number (1-based), parsed object or None, parse error)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row, ""
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line), ""
            except json.JSONDecodeError as e:
                yield i, None, f"invalid JSON ({e.msg} at column {e.colno})"


def validate_record(obj: Any, default_id: str, prompt_key: str = "prompt",
                    answer_key: str = "answer", require_answer: bool = True) -> dict[str, Any]:
    """Return a normalised copy of `obj` or raise ValueError("field 'x': ...")."""
    if not isinstance(obj, dict):
        raise ValueError(f"record is a {type(obj).__name__}, expected a JSON object")
    rec = dict(obj)
    p = rec.get(prompt_key)
    if isinstance(p, list):
        ok = bool(p) and all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in p)
        if not ok:
            raise ValueError(f"field '{prompt_key}': a message list needs {{'role', 'content'}} dicts")
    elif not isinstance(p, str) or not p.strip():
        what = "missing" if p is None else f"is {type(p).__name__} {str(p)[:20]!r}"
        raise ValueError(f"field '{prompt_key}' {what}; expected a non-empty string")
    rec["prompt"] = p
    a = rec.get(answer_key)
    if a is None:
        if require_answer:
            raise ValueError(f"field '{answer_key}' missing; expected a string or number")
        a = ""
    elif isinstance(a, bool) or not isinstance(a, (str, int, float)):
        raise ValueError(f"field '{answer_key}' is {type(a).__name__}; expected a string or number")
    rec["answer"] = str(a)
    sol = rec.get("solution")
    if sol is not None and not isinstance(sol, str):
        raise ValueError(f"field 'solution' is {type(sol).__name__}; expected a string")
    hints = rec.get("hints")
    if hints is not None:
        if isinstance(hints, str):
            rec["hints"] = [hints]
        elif not (isinstance(hints, list) and all(isinstance(h, str) for h in hints)):
            raise ValueError("field 'hints' must be a string or a list of strings")
    rid = rec.get("id")
    if rid is None:
        rec["id"] = default_id
    elif isinstance(rid, (str, int)) and not isinstance(rid, bool):
        rec["id"] = str(rid)
    else:
        raise ValueError(f"field 'id' is {type(rid).__name__}; expected a string or integer")
    return rec


def load_prompt_set(path: str, skip_bad_records: bool = False, prompt_key: str = "prompt",
                    answer_key: str = "answer", require_answer: bool = True) -> PromptSet:
    """Load and validate `path` (.jsonl/.json lines or .parquet).

    Raises DataError naming `path:line` and the field for the first bad record, unless
    `skip_bad_records`; then bad records are dropped and their count is logged and returned.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: prompt file not found (check data.train_files / data.eval_files)")
    stem = os.path.splitext(os.path.basename(path))[0]
    out = PromptSet(path=path)
    for lineno, obj, err in _iter_raw(path):
        try:
            if err:
                raise ValueError(err)
            out.records.append(validate_record(obj, f"{stem}:{lineno}", prompt_key, answer_key, require_answer))
        except ValueError as e:
            if not skip_bad_records:
                raise DataError(f"{path}:{lineno}: {e} (fix it or set data.skip_bad_records=true)") from None
            out.num_skipped += 1
    if out.num_skipped:
        log.warning("%s: skipped %d bad record(s) (data.skip_bad_records=true)", path, out.num_skipped)
    if not out.records:
        raise DataError(f"{path}: no usable records")
    return out


def load_prompt_sets(paths: list[str] | str, **kw: Any) -> PromptSet:
    """Concatenate several files (a single path or a list) into one PromptSet."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise DataError("no prompt files given (set data.train_files)")
    sets = [load_prompt_set(p, **kw) for p in paths]
    merged = PromptSet(path=",".join(paths))
    for s in sets:
        merged.records.extend(s.records)
        merged.num_skipped += s.num_skipped
    return merged
