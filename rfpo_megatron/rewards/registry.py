"""Registry of reward functions by name: `get_reward_fn("math" | "exact_match" | "addition" | "addition_strict", **kw)`."""
from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_reward(name: str) -> Callable:
    """Decorator: register a verifier factory under `name` (factory(**kwargs) -> Verifier)."""

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available_rewards() -> list[str]:
    """Sorted registered names."""
    return sorted(_REGISTRY)


def get_reward_fn(name: str, **kwargs: Any) -> Any:
    """Build the verifier registered as `name`; unknown names raise with the list of valid ones."""
    if name not in _REGISTRY:
        from rfpo_megatron.config import unknown_name_message

        raise ValueError(unknown_name_message("data.reward_fn", name, available_rewards()))
    return _REGISTRY[name](**kwargs)


@register_reward("math")
def _math(**kw: Any) -> Any:
    from rfpo_megatron.rewards.math_verifier import MathVerifier

    return MathVerifier(**kw)


@register_reward("exact_match")
def _exact(**kw: Any) -> Any:
    from rfpo_megatron.rewards.exact_match import ExactMatchVerifier

    return ExactMatchVerifier(**kw)


@register_reward("arithmetic")  # alias used by config.py
@register_reward("addition")
def _addition(**kw: Any) -> Any:
    from rfpo_megatron.rewards.addition import AdditionVerifier

    return AdditionVerifier(**kw)


@register_reward("addition_strict")
def _addition_strict(**kw: Any) -> Any:
    """Addition task where every column step must be right too (no credit for a copied answer)."""
    from rfpo_megatron.rewards.addition import AdditionVerifier

    return AdditionVerifier(require_steps=True, **kw)
