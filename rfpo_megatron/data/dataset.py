"""Prompt sets from jsonl/parquet files, globs of them, or HF `datasets` saved to disk: records with `prompt`,
`answer`, optional `solution`, `hints`, `id` (the record fields they are read from: data.prompt_key, answer_key,
solution_key, id_key).

A malformed record raises `DataError("<file>:<line>: field '<name>' ...")` unless
`skip_bad_records=True`, which drops it and logs how many were skipped. `prompt` is a string or a
list of chat messages ({"role", "content"}); `answer` may be a number (stored as its string).
Extra fields are kept (verifiers may use them).
"""
from __future__ import annotations

import glob
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


def is_hf_dataset_dir(path: str) -> bool:
    """True for a directory written by `datasets.Dataset.save_to_disk` (or a DatasetDict's)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("state.json", "dataset_dict.json"))


def resolve_data_files(entries: list[str] | str) -> list[str]:
    """Expand data.train_files / eval_files entries: a glob (`data/*.jsonl`, `**` allowed) becomes its sorted
    matches; files and HF `datasets` directories stay. Raises DataError for a glob matching nothing, a missing
    path, or a directory that is not a saved dataset."""
    entries = [entries] if isinstance(entries, str) else list(entries)
    out: list[str] = []
    for entry in entries:
        entry = str(entry)
        if glob.has_magic(entry):
            found = sorted(glob.glob(entry, recursive=True))
            if not found:
                raise DataError(f"{entry}: the glob matches no file (check data.train_files / data.eval_files)")
            out.extend(found)
        elif not os.path.exists(entry):
            raise DataError(f"{entry}: prompt file not found (check data.train_files / data.eval_files)")
        elif os.path.isdir(entry) and not is_hf_dataset_dir(entry):
            raise DataError(f"{entry}: a directory that is not a `datasets` save_to_disk dir; give files or a glob "
                            f"such as {os.path.join(entry, '*.jsonl')}")
        else:
            out.append(entry)
    return out


def _iter_hf_dataset(path: str) -> Iterator[tuple[int, Any, str]]:
    """Rows of a `datasets.Dataset.save_to_disk` directory (needs the `datasets` package)."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as fh:
            splits = json.load(fh).get("splits", [])
        raise DataError(f"{path}: a DatasetDict with splits {splits}; name one split directory, e.g. "
                        f"{os.path.join(path, splits[0] if splits else 'train')}")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a dataset saved with `datasets.save_to_disk` needs the `datasets` package "
                        "(pip install datasets), or export it to jsonl/parquet") from None
    for i, row in enumerate(datasets.load_from_disk(path), start=1):
        yield i, dict(row), ""


def _iter_raw(path: str) -> Iterator[tuple[int, Any, str]]:
    """Yield (line_or_row_number (1-based), parsed object or None, parse error)."""
    if os.path.isdir(path):
        yield from _iter_hf_dataset(path)
        return
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


def validate_record(obj: Any, default_id: str, prompt_key: str = "prompt", answer_key: str = "answer",
                    require_answer: bool = True, solution_key: str = "solution", id_key: str = "id") -> dict[str, Any]:
    """Return a normalised copy of `obj` (`prompt`, `answer`, `solution`, `id` read from the mapped fields; the
    original fields are kept) or raise ValueError("field 'x': ...")."""
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
    sol = rec.get(solution_key)
    if sol is not None and not isinstance(sol, str):
        raise ValueError(f"field '{solution_key}' is {type(sol).__name__}; expected a string")
    if sol is not None:
        rec["solution"] = sol
    hints = rec.get("hints")
    if hints is not None:
        if isinstance(hints, str):
            rec["hints"] = [hints]
        elif not (isinstance(hints, list) and all(isinstance(h, str) for h in hints)):
            raise ValueError("field 'hints' must be a string or a list of strings")
    rid = rec.get(id_key)
    if rid is None:
        rec["id"] = default_id
    elif isinstance(rid, (str, int)) and not isinstance(rid, bool):
        rec["id"] = str(rid)
    else:
        raise ValueError(f"field '{id_key}' is {type(rid).__name__}; expected a string or integer")
    return rec


def load_prompt_set(path: str, skip_bad_records: bool = False, prompt_key: str = "prompt",
                    answer_key: str = "answer", require_answer: bool = True, solution_key: str = "solution",
                    id_key: str = "id") -> PromptSet:
    """Load and validate `path` (.jsonl/.json lines, .parquet, or a `datasets` save_to_disk directory).

    Raises DataError naming `path:line` and the field for the first bad record, unless
    `skip_bad_records`; then bad records are dropped and their count is logged and returned.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: prompt file not found (check data.train_files / data.eval_files)")
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    out = PromptSet(path=path)
    for lineno, obj, err in _iter_raw(path):
        try:
            if err:
                raise ValueError(err)
            out.records.append(validate_record(obj, f"{stem}:{lineno}", prompt_key, answer_key, require_answer,
                                               solution_key, id_key))
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
    """Concatenate several files (a single path or a list; globs expanded) into one PromptSet."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise DataError("no prompt files given (set data.train_files)")
    paths = resolve_data_files(paths)
    sets = [load_prompt_set(p, **kw) for p in paths]
    merged = PromptSet(path=",".join(paths))
    for s in sets:
        merged.records.extend(s.records)
        merged.num_skipped += s.num_skipped
    return merged


def load_kwargs(data_cfg: Any) -> dict[str, Any]:
    """The `load_prompt_set(s)` keyword arguments a run's `data` section asks for (field mapping, bad records)."""
    return {"skip_bad_records": bool(getattr(data_cfg, "skip_bad_records", False)),
            **{k: str(getattr(data_cfg, k)) for k in ("prompt_key", "answer_key", "solution_key", "id_key")
               if hasattr(data_cfg, k)}}
