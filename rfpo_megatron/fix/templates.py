"""Fix-prompt templates for the four variants: rewrite, reward, error_info, reference.

Templates are plain strings with named placeholders, editable from YAML (`rfpo.fix.templates.<variant>`):
  {prompt}    the original user prompt (record["prompt"]; for a message list, the last user turn)
  {response}  the policy's wrong response o (decoded)
  {error}     the verifier's short error message (error_info)
  {reference} the reference answer (record["answer"])
  {solution}  the reference step-by-step solution (record["solution"], else the answer)
  {hints}     the record's hints joined by newlines ("" if none)
Only these names are substituted; any other braces (LaTeX \\boxed{...}) are left as written.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

VARIANTS = ("rewrite", "reward", "error_info", "reference")
PLACEHOLDERS = ("prompt", "response", "error", "reference", "solution", "hints")

DEFAULT_TEMPLATES: dict[str, str] = {
    "rewrite": (
        "{prompt}\n\nHere is a previous attempt at this problem:\n{response}\n\n"
        "Review the attempt step by step and write a complete, corrected solution."
    ),
    "reward": (
        "{prompt}\n\nHere is a previous attempt at this problem:\n{response}\n\n"
        "This attempt is incorrect. Find the mistake and write a complete, correct solution."
    ),
    "error_info": (
        "{prompt}\n\nHere is a previous attempt at this problem:\n{response}\n\n"
        "This attempt is incorrect. Verifier feedback: {error}\n\n"
        "Write a complete, correct solution."
    ),
    "reference": (
        "{prompt}\n\nHere is a previous attempt at this problem:\n{response}\n\n"
        "This attempt is incorrect. The correct final answer is: {reference}\n\n"
        "Write a complete solution that reaches the correct answer."
    ),
}

# A variant's template must show the information that defines it.
_REQUIRED = {"error_info": ("error",), "reference": ("reference", "solution")}
_PH = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


def resolve_templates(overrides: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Defaults updated with `overrides` (variant -> template); validates names and required fields."""
    out = dict(DEFAULT_TEMPLATES)
    for name, tpl in dict(overrides or {}).items():
        if tpl is None:
            continue
        if name not in VARIANTS:
            raise ValueError(f"rfpo.fix.templates.{name}: unknown variant; use one of {', '.join(VARIANTS)}")
        if not isinstance(tpl, str) or not tpl.strip():
            raise ValueError(f"rfpo.fix.templates.{name}: must be a non-empty string")
        out[name] = tpl
    for name, need in _REQUIRED.items():
        if not any("{" + k + "}" in out[name] for k in need):
            raise ValueError(f"rfpo.fix.templates.{name}: must contain "
                             + " or ".join("{" + k + "}" for k in need))
    return out


def prompt_text_of(record: Mapping[str, Any]) -> str:
    """The user prompt as text (for message lists: the last user turn)."""
    p = record.get("prompt", "")
    if isinstance(p, list):
        users = [m["content"] for m in p if m.get("role") == "user"]
        return users[-1] if users else (p[-1]["content"] if p else "")
    return str(p)


def render_fix_prompt(template: str, record: Mapping[str, Any], response: str, error: str = "") -> str:
    """Fill `template`'s placeholders from the record, the wrong response and the verifier message."""
    hints = record.get("hints") or []
    values = {
        "prompt": prompt_text_of(record),
        "response": response,
        "error": error or "the answer is incorrect",
        "reference": str(record.get("answer", "")),
        "solution": str(record.get("solution") or record.get("answer", "")),
        "hints": "\n".join(hints) if isinstance(hints, list) else str(hints),
    }
    return _PH.sub(lambda m: values[m.group(1)], template)
