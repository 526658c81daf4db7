"""Batching helpers: encode records into prompts, chunk lists (padding: rfpo_megatron.actor.batch.pad_tokens)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, TypeVar

from rfpo_megatron.data.template import PromptFormat, encode_prompt, format_prompt

T = TypeVar("T")


@dataclass
class PromptItem:
    """One record ready for rollout: chat-formatted text and its [P] token ids."""

    record: dict[str, Any]
    prompt_text: str
    prompt_ids: list[int]


def build_prompts(records: Sequence[dict[str, Any]], tokenizer: Any,
                  fmt: Optional[PromptFormat] = None, max_prompt_len: Optional[int] = None) -> list[PromptItem]:
    """Format and tokenize each record's prompt; prompts longer than `max_prompt_len` raise (id named)."""
    out = []
    for rec in records:
        text = format_prompt(tokenizer, rec["prompt"], fmt)
        ids = encode_prompt(tokenizer, rec["prompt"], fmt)
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            raise ValueError(f"record '{rec.get('id')}': prompt has {len(ids)} tokens > "
                             f"data.max_prompt_length={max_prompt_len}; raise it or filter the data")
        out.append(PromptItem(rec, text, ids))
    return out


def chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """Consecutive slices of at most `size` items."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield list(items[i:i + size])
