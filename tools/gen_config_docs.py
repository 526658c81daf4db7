"""Regenerate docs/configs.md from the dataclasses in rfpo_megatron/config.py (the single source of truth).

    python tools/gen_config_docs.py          # rewrite docs/configs.md
    python tools/gen_config_docs.py --check  # exit 1 if docs/configs.md is stale (used by the tests)
"""
from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re
import sys

from rfpo_megatron import config as C

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "configs.md"
SECTIONS = [("algo", C.AlgoConfig), ("algo.rollout_correction", C.RolloutCorrectionConfig), ("rfpo", C.RFPOConfig), ("rfpo.fix", C.FixConfig), ("actor", C.ActorConfig),
            ("critic", C.CriticConfig), ("rollout", C.RolloutConfig), ("data", C.DataConfig), ("logging", C.LoggingConfig),
            ("trainer", C.TrainerConfig)]
HEADER = """# Configuration reference

Generated from `rfpo_megatron/config.py` by `python tools/gen_config_docs.py` (a test fails when it is stale).

A run is one YAML file of sections plus `section.key=value` overrides on the command line:

```bash
rfpo-megatron train examples/tiny_cpu/config.yaml algo.adv_estimator=dr_grpo rfpo.fix.variant=error_info
```

Unknown keys, wrong types and out-of-range values fail at start with one line naming the field, the value and what
is allowed (`unknown config key 'algo.clip_ratio_lwo' (did you mean 'clip_ratio_low'?)`). Names follow verl/slime
where one exists. Override values are parsed as YAML scalars (`null`, `true`, `[a,b]`).
"""


def _comments(cls) -> dict[str, str]:
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip().replace("|", "\\|")  # a bare | would split the table cell
    return out


def render() -> str:
    lines = [HEADER]
    for prefix, cls in SECTIONS:
        notes = _comments(cls)
        lines += [f"## `{prefix}` — {cls.__doc__.strip()}", "", "| key | type | default | notes |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{prefix}.{f.name}` | {f.type} | `{default!r}` | {notes.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run `python tools/gen_config_docs.py`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
