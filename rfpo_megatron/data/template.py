"""Prompt formatting: the tokenizer's chat template when it has one, else a plain template (configurable).

`mode`: "auto" (chat template if the tokenizer defines one, else plain), "chat" (required), or
"plain" (`plain_template.format(prompt=...)`, no chat markup). `system_prompt` is prepended as a
system message in chat mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class PromptFormat:
    """How a record's prompt becomes model input text."""

    mode: str = "auto"  # auto | chat | plain
    plain_template: str = "{prompt}"
    system_prompt: Optional[str] = None

    @classmethod
    def from_any(cls, cfg: Any) -> "PromptFormat":
        """Build from a PromptFormat, a dict, an object with these attributes, or None (defaults)."""
        if cfg is None or isinstance(cfg, cls):
            return cfg or cls()
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        return cls(mode=get("mode", get("chat_template_mode", "auto")) or "auto",
                   plain_template=get("plain_template", "{prompt}") or "{prompt}",
                   system_prompt=get("system_prompt", None))


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer defines a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, prompt: Any, fmt: Optional[PromptFormat] = None) -> str:
    """Model-input text for `prompt` (a string or a list of {role, content} messages)."""
    fmt = fmt or PromptFormat()
    if fmt.mode not in ("auto", "chat", "plain"):
        raise ValueError(f"data.prompt_format.mode='{fmt.mode}' is invalid; use auto, chat or plain")
    use_chat = fmt.mode == "chat" or (fmt.mode == "auto" and has_chat_template(tokenizer))
    if fmt.mode == "chat" and not has_chat_template(tokenizer):
        raise ValueError("data.prompt_format.mode=chat but the tokenizer has no chat_template; "
                         "use mode=auto or plain")
    if use_chat:
        msgs = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if fmt.system_prompt and not any(m.get("role") == "system" for m in msgs):
            msgs = [{"role": "system", "content": fmt.system_prompt}] + msgs
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, list):
        prompt = "\n".join(m["content"] for m in prompt)
    text = fmt.plain_template.format(prompt=prompt)
    return f"{fmt.system_prompt}\n{text}" if fmt.system_prompt else text


def encode_prompt(tokenizer: Any, prompt: Any, fmt: Optional[PromptFormat] = None) -> list[int]:
    """[P] token ids of `format_prompt(...)`; no extra special tokens beyond the template's own."""
    text = format_prompt(tokenizer, prompt, fmt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
