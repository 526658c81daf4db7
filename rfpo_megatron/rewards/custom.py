"""User reward functions by path: `data.reward_fn: "pkg.module:fn"` or `"path/to/file.py:fn"`.

The target is one of
  * a per-sample function `fn(response_text, answer, record, **reward_kwargs)`;
  * a batched function whose first parameter is named `items` (or `batch`): `fn(items, **reward_kwargs)` with
    `items = [(response_text, answer, record), ...]`, returning one result per item, in order;
  * a class, built once as `cls(**reward_kwargs)`, with `score(response_text, answer, record)` and/or
    `score_batch(items)` (the batched one is used when both exist).
Any of them may be `async def`; per-sample coroutines of one batch run concurrently. A result is a
`RewardResult`, a number, a `(reward, message)` tuple or a `{"reward": x, "message": m}` dict; the message
is what the fix stage's `error_info` variant shows. `record` is the dataset record (prompt, answer, solution,
id and every extra field). Errors are per item (`score_outcomes`); the error policy is `rewards.guard`'s.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rfpo_megatron.aio import run_blocking
from rfpo_megatron.config import ConfigError
from rfpo_megatron.rewards.base import OutcomeScorer, RewardResult, ScoreItem

BATCH_PARAM_NAMES = ("items", "batch")
Outcome = Any  # RewardResult | BaseException, one per item


def is_path_spec(spec: str) -> bool:
    """True for a `module:attr` or `file.py:attr` reward spec (registered names have no ':')."""
    return ":" in str(spec)


def _import_file(path: str, spec: str) -> Any:
    """Import a .py file under a stable private module name (so pickling/dataclasses inside it work)."""
    name = "rfpo_user_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(name, path)
    if mspec is None or mspec.loader is None:
        raise ConfigError(f"config field 'data.reward_fn': '{spec}': cannot import '{path}' as Python")
    mod = importlib.util.module_from_spec(mspec)
    sys.modules[name] = mod
    try:
        mspec.loader.exec_module(mod)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"config field 'data.reward_fn': '{spec}': importing '{path}' raised "
                          f"{one_line(exc)}") from None
    return mod


def load_object(spec: str) -> Any:
    """The object `spec` = "pkg.module:attr" or "path/to/file.py:attr" names; ConfigError (one line) if not."""
    target, _, attr = str(spec).rpartition(":")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(path):
            raise ConfigError(f"config field 'data.reward_fn': '{spec}': file '{path}' not found")
        mod = _import_file(path, spec)
    else:
        try:
            mod = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"config field 'data.reward_fn': '{spec}': no module named '{exc.name}' (is it on "
                              "PYTHONPATH? a file path must end in .py)") from None
        except Exception as exc:
            raise ConfigError(f"config field 'data.reward_fn': '{spec}': importing '{target}' raised "
                              f"{one_line(exc)}") from None
    if not hasattr(mod, attr):
        names = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"config field 'data.reward_fn': '{spec}': '{target}' has no attribute '{attr}' "
                          f"(callables there: {names})")
    return getattr(mod, attr)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """`Type: message`, first line only, clipped to `limit` characters."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_result(value: Any) -> RewardResult:
    """Normalise a reward function's return value; TypeError / ValueError for anything else or non-finite."""
    if isinstance(value, RewardResult):
        res = value
    elif isinstance(value, dict) and ("reward" in value or "score" in value):
        res = RewardResult(float(value.get("reward", value.get("score"))), str(value.get("message", "") or ""))
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        res = RewardResult(float(value[0]), str(value[1] or ""))
    elif isinstance(value, (int, float)) and not isinstance(value, complex):
        res = RewardResult(float(value), "")
    else:
        raise TypeError(f"returned {type(value).__name__} {str(value)[:40]!r}; expected a number, "
                        "(reward, message), {'reward', 'message'} or a RewardResult")
    if not math.isfinite(res.reward):
        raise ValueError(f"returned a non-finite reward ({res.reward})")
    return res


def _check_signature(fn: Callable, spec: str, n_args: int, kwargs: dict) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call decide
    try:
        sig.bind(*([None] * n_args), **kwargs)
    except TypeError as exc:
        want = "(items, **reward_kwargs)" if n_args == 1 else "(response_text, answer, record, **reward_kwargs)"
        raise ConfigError(f"config field 'data.reward_fn': '{spec}' has signature {getattr(fn, '__name__', fn)}{sig}, "
                          f"which cannot be called as {want} with data.reward_kwargs {sorted(kwargs)}: {exc}") from None


def _is_batched(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] in BATCH_PARAM_NAMES


@dataclass
class CustomReward(OutcomeScorer):
    """A user reward function/class behind the registry's verifier interface (`score`, `score_batch`,
    `score_outcomes`); built by `load_custom_reward`."""

    name: str
    fn: Callable[..., Any]
    batched: bool
    kwargs: dict = field(default_factory=dict)
    owner: Any = None  # the instance when the target is a class (closed with it)

    def score_outcomes(self, items: Sequence[ScoreItem]) -> list[Outcome]:
        """One RewardResult or the exception it raised, per item (a batch-level failure fails every item)."""
        items = list(items)
        if not items:
            return []
        if self.batched:
            try:
                out = _run(self.fn(items, **self.kwargs))
                out = list(out)
            except Exception as exc:
                return [exc] * len(items)
            if len(out) != len(items):
                err = ValueError(f"returned {len(out)} results for a batch of {len(items)}")
                return [err] * len(items)
            return [_safe(to_result, v) for v in out]
        if inspect.iscoroutinefunction(self.fn):
            return _run(_gather(self.fn, items, self.kwargs))
        outs = []
        for resp, ans, rec in items:
            try:
                outs.append(to_result(_run(self.fn(resp, ans, rec, **self.kwargs))))
            except Exception as exc:
                outs.append(exc)
        return outs


    def close(self) -> None:
        if self.owner is not None and hasattr(self.owner, "close"):
            self.owner.close()


def _safe(fn: Callable, value: Any) -> Outcome:
    try:
        return fn(value)
    except Exception as exc:
        return exc


async def _gather(fn: Callable, items: list[ScoreItem], kwargs: dict) -> list[Outcome]:
    outs = await asyncio.gather(*(fn(r, a, rec, **kwargs) for r, a, rec in items), return_exceptions=True)
    return [o if isinstance(o, BaseException) else _safe(to_result, o) for o in outs]


def _run(value: Any) -> Any:
    """Await `value` in a fresh event loop when it is awaitable (the trainer itself is synchronous)."""
    if inspect.isawaitable(value):
        async def _await() -> Any:
            return await value
        return run_blocking(_await(), name="custom-reward")
    return value


def load_custom_reward(spec: str, kwargs: dict | None = None) -> CustomReward:
    """Load `spec` and check its signature against `kwargs` (data.reward_kwargs); ConfigError (one line) when the
    path, the attribute, the signature or the class's constructor is wrong."""
    kwargs = dict(kwargs or {})
    obj = load_object(spec)
    if inspect.isclass(obj):
        has_batch, has_score = hasattr(obj, "score_batch"), hasattr(obj, "score")
        if not (has_batch or has_score):
            raise ConfigError(f"config field 'data.reward_fn': class '{spec}' has neither score(response_text, "
                              "answer, record) nor score_batch(items)")
        try:
            inst = obj(**kwargs)
        except Exception as exc:
            raise ConfigError(f"config field 'data.reward_fn': '{spec}'(**data.reward_kwargs) raised "
                              f"{one_line(exc)}") from None
        fn = inst.score_batch if has_batch else inst.score
        _check_signature(fn, spec, 1 if has_batch else 3, {})
        return CustomReward(spec, fn, has_batch, {}, owner=inst)
    if not callable(obj):
        raise ConfigError(f"config field 'data.reward_fn': '{spec}' is a {type(obj).__name__}, not a function or class")
    batched = _is_batched(obj)
    _check_signature(obj, spec, 1 if batched else 3, kwargs)
    return CustomReward(spec, obj, batched, kwargs)
