"""Prompt formatting: the tokenizer's chat template when it has one, else a plain template (configurable).

`mode`: "auto" (chat template if the tokenizer defines one, else plain), "chat" (required), or
"plain" (`plain_template.format(prompt=...)`, no chat markup). `system_prompt` is prepended as a
system message in chat mode.

`env_turn_text` / `encode_env_turn` give the text that follows a model turn in a multi-turn dialogue: the
close of the assistant turn (whatever of it the model's stop token did not already produce), a user turn with
the environment's reply, and the generation prompt of the next assistant turn.
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


_PROBE_USER, _PROBE_ASSISTANT = "\x00probe-user\x00", "\x00probe-assistant\x00"


def env_turn_text(tokenizer: Any, reply: str, fmt: Optional[PromptFormat] = None, model_tail: str = "") -> str:
    """Text appended after a model turn whose decoded text ends with `model_tail` (its stop token as text, or
    "" when it ran out of tokens): the rest of the assistant-turn close, `reply` as a user turn, and the next
    generation prompt. Chat mode reads all three off the tokenizer's chat template (rendered with probe
    messages, so no template-specific string is hard-coded); plain mode is "\n{reply}\n"."""
    fmt = fmt or PromptFormat()
    use_chat = fmt.mode == "chat" or (fmt.mode == "auto" and has_chat_template(tokenizer))
    if not use_chat:
        return f"\n{reply}\n"
    two = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
    closed = tokenizer.apply_chat_template(two, tokenize=False, add_generation_prompt=False)
    more = tokenizer.apply_chat_template(two + [{"role": "user", "content": reply}], tokenize=False,
                                         add_generation_prompt=True)
    if not more.startswith(closed) or _PROBE_ASSISTANT not in closed:
        raise ValueError("the tokenizer's chat template does not render a dialogue as a growing prefix; "
                         "multi-turn rollouts need one (or data.chat_template=false)")
    close = closed[closed.rindex(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT):]  # e.g. "<|im_end|>\n"
    if model_tail and close.startswith(model_tail):
        close = close[len(model_tail):]
    return close + more[len(closed):]


def encode_env_turn(tokenizer: Any, reply: str, fmt: Optional[PromptFormat] = None,
                    model_tail: str = "") -> list[int]:
    """[E] token ids of `env_turn_text(...)` (tokenized on their own: the dialogue's ids are never re-tokenized)."""
    return list(tokenizer(env_turn_text(tokenizer, reply, fmt, model_tail), add_special_tokens=False)["input_ids"])
