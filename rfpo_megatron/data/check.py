"""`rfpo-megatron data check FILES...`: validate prompt sets against a run config's `data` section.

Every record is read as training would read it (field mapping data.prompt_key/answer_key/solution_key/id_key,
globs expanded, parquet and `datasets` directories) plus an optional per-record check from the reward function
(e.g. the code verifier needs `tests`). The first bad record is printed as `file:line: field '<name>' ...` and
the command exits 1; a clean set prints one summary line per file and exits 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rfpo_megatron.data.dataset import DataError, _iter_raw, resolve_data_files, validate_record

RecordCheck = Callable[[dict[str, Any]], Optional[str]]  # record -> None (fine) or "field 'x': ..."


@dataclass
class CheckReport:
    """Outcome of `check_files`: records per file, and the first problem ("" when none)."""

    counts: dict[str, int] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def check_files(entries: list[str], data_cfg: Any = None, record_check: Optional[RecordCheck] = None) -> CheckReport:
    """Validate every record of `entries` (files, globs, dataset dirs); stop at the first bad one."""
    from rfpo_megatron.data.dataset import load_kwargs

    kw = load_kwargs(data_cfg) if data_cfg is not None else {}
    kw.pop("skip_bad_records", None)
    report = CheckReport()
    try:
        paths = resolve_data_files(entries)
        for path in paths:
            stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
            n = 0
            for lineno, obj, err in _iter_raw(path):
                try:
                    if err:
                        raise ValueError(err)
                    rec = validate_record(obj, f"{stem}:{lineno}", **kw)
                    problem = record_check(rec) if record_check is not None else None
                    if problem:
                        raise ValueError(problem)
                except ValueError as e:
                    report.error = f"{path}:{lineno}: {e}"
                    return report
                n += 1
            if n == 0:
                report.error = f"{path}: no records"
                return report
            report.counts[path] = n
    except DataError as e:
        report.error = str(e)
    return report
