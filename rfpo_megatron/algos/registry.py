"""Name -> function registries for advantage estimators and policy losses, with "did you mean" lookup.

`ADV_ESTIMATORS[name]` is a function `fn(*, rewards [B], group_ids [B] long, response_mask [B, T], **kw)
-> (advantages [B, T], returns [B, T])` (see advantages.py).
`POLICY_LOSSES[name]` is a function `fn(logp [B, T], old_logp [B, T], advantages [B, T],
response_mask [B, T], *, log_roff [B] | None, loss_form, clip_ratio_low, clip_ratio_high, clip_ratio_c, ...)
-> (loss [B, T] per token (0 on padding), metrics dict[str, 0-dim tensor])` (see policy_loss.py).
`ROLLOUT_CORRECTIONS[name]` is a function `fn(log_ratio [B, T] float64, keep [B, T] bool, **knobs) -> (weight
[B, T] | None, keep [B, T] bool)` (see correction.py).
The tables are filled when advantages.py, policy_loss.py and correction.py are imported, which rfpo_megatron/algos/__init__.py
does before any module of the package can be used (this module imports neither: no import circle).
"""

from __future__ import annotations

from typing import Callable, TypeVar

from rfpo_megatron.config import unknown_name_message

F = TypeVar("F", bound=Callable)

ADV_ESTIMATORS: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}
ROLLOUT_CORRECTIONS: dict[str, Callable] = {}


def _register(table: dict[str, Callable], kind: str, name: str) -> Callable[[F], F]:
    def deco(fn: F) -> F:
        if name in table and table[name] is not fn:
            raise ValueError(f"{kind} {name!r} is already registered (by {table[name].__module__}.{table[name].__name__})")
        table[name] = fn
        return fn

    return deco


def register_adv_estimator(name: str) -> Callable[[F], F]:
    """Decorator: register `fn` under `name` in ADV_ESTIMATORS."""
    return _register(ADV_ESTIMATORS, "adv_estimator", name)


def register_policy_loss(name: str) -> Callable[[F], F]:
    """Decorator: register `fn` under `name` in POLICY_LOSSES."""
    return _register(POLICY_LOSSES, "policy_loss", name)


def register_rollout_correction(name: str) -> Callable[[F], F]:
    """Decorator: register `fn` under `name` in ROLLOUT_CORRECTIONS."""
    return _register(ROLLOUT_CORRECTIONS, "rollout_correction", name)


def _lookup(table: dict[str, Callable], field: str, name: str) -> Callable:
    try:
        return table[name]
    except KeyError:
        raise ValueError(unknown_name_message(field, name, sorted(table))) from None


def get_adv_estimator(name: str) -> Callable:
    """The registered advantage estimator `name`; ValueError with a "did you mean" hint otherwise."""
    return _lookup(ADV_ESTIMATORS, "algo.adv_estimator", name)


def get_policy_loss(name: str) -> Callable:
    """The registered policy loss `name`; ValueError with a "did you mean" hint otherwise."""
    return _lookup(POLICY_LOSSES, "algo.policy_loss", name)


def get_rollout_correction(name: str) -> Callable:
    """The registered rollout-correction mode `name`; ValueError with a "did you mean" hint otherwise."""
    return _lookup(ROLLOUT_CORRECTIONS, "algo.rollout_correction.modes", name)
