"""Registry of reward functions: `get_reward_fn("math" | "exact_match" | "addition" | "addition_strict" | "code" |
"pkg.module:fn" | "path/file.py:fn", **kw)`, and `build_reward(cfg.data)`: the one way a run gets its verifier
(a registered name, a user function by path, or `data.reward_url`), under the error policy (`rewards.guard`)."""
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


def _unknown(name: str) -> str:
    from rfpo_megatron.config import unknown_name_message

    return (unknown_name_message("data.reward_fn", name, available_rewards())
            + "; a custom one is 'pkg.module:fn' or 'path/to/file.py:fn'")


def get_reward_fn(name: str, **kwargs: Any) -> Any:
    """Build the verifier registered as `name`, or load the user function/class `name` = "module:fn" /
    "file.py:fn" (rewards.custom); unknown names raise with the list of valid ones."""
    from rfpo_megatron.rewards.custom import is_path_spec, load_custom_reward

    if is_path_spec(name):
        return load_custom_reward(name, kwargs)
    if name not in _REGISTRY:
        raise ValueError(_unknown(name))
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as exc:
        from rfpo_megatron.config import ConfigError

        raise ConfigError(f"config field 'data.reward_kwargs': {sorted(kwargs)} do not fit reward '{name}': {exc}") from None


def check_reward_spec(data_cfg: Any) -> None:
    """Fail early (ConfigError naming the field) on an unknown reward name or a user function that cannot be
    loaded or called as configured; nothing is built (a remote service is checked when it is first used)."""
    from rfpo_megatron.config import ConfigError
    from rfpo_megatron.rewards.custom import is_path_spec, load_custom_reward

    if getattr(data_cfg, "reward_url", None):
        return
    name = str(data_cfg.reward_fn)
    if is_path_spec(name):
        load_custom_reward(name, dict(getattr(data_cfg, "reward_kwargs", {}) or {})).close()
    elif name not in _REGISTRY:
        raise ConfigError(_unknown(name))


def build_reward(data_cfg: Any) -> Any:
    """The run's verifier from its `data` section: `reward_url` (remote service) or `reward_fn` with
    `reward_kwargs`, wrapped in `GuardedReward` with `reward_error_policy`. Call `.close()` when done."""
    from rfpo_megatron.rewards.guard import GuardedReward

    policy = str(getattr(data_cfg, "reward_error_policy", "raise"))
    url = getattr(data_cfg, "reward_url", None)
    if url:
        from rfpo_megatron.rewards.remote import RemoteReward

        inner = RemoteReward(url, batch_size=data_cfg.reward_url_batch_size,
                             concurrency=data_cfg.reward_url_concurrency, timeout_s=data_cfg.reward_url_timeout_s,
                             attempts=data_cfg.reward_url_attempts, backoff_s=data_cfg.reward_url_backoff_s)
        return GuardedReward(inner, url, policy, field="data.reward_url")
    name = str(data_cfg.reward_fn)
    inner = get_reward_fn(name, **dict(getattr(data_cfg, "reward_kwargs", {}) or {}))
    return GuardedReward(inner, name, policy)


def record_check_for(name: str) -> Any:
    """The per-record data check a reward needs beyond prompt/answer (`rfpo-megatron data check`), or None."""
    if name == "code":
        from rfpo_megatron.rewards.code_exec import check_record

        return check_record
    return None


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


@register_reward("code")
def _code(**kw: Any) -> Any:
    """Runs the response's code against the record's `tests` in a sandbox (rewards/code_exec.py)."""
    from rfpo_megatron.rewards.code_exec import CodeVerifier

    return CodeVerifier(**kw)
