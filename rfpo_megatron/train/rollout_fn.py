"""What a rollout.generate_fn works with: the RolloutContext it is handed, and the loader of user functions by
"pkg.module:fn" or "path/file.py:fn" (also used for rollout.generate_kwargs.env_fn); GenerateFnError is their
one-line error. The calling and checking of generate functions: rfpo_megatron.train.custom_rollout.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rfpo_megatron.config import ConfigError
from rfpo_megatron.data.template import PromptFormat, encode_env_turn


class GenerateFnError(ConfigError):
    """A custom generate_fn (or env_fn) could not be loaded, has the wrong signature or returned the wrong thing."""


@dataclass
class RolloutContext:
    """What a generate_fn gets besides the engine: tokenization, the verifier and its keyword arguments.

    tokenizer: the HF tokenizer; prompt_format: how prompts are formatted (data.chat_template);
    max_prompt_len: data.max_prompt_len; verifier: data.reward_fn's verifier (rank 0); answer_key:
    data.answer_key; success_threshold: rfpo.fix.success_threshold (a response at or above it is correct);
    kwargs: rollout.generate_kwargs.
    """

    tokenizer: Any
    prompt_format: Optional[PromptFormat] = None
    max_prompt_len: Optional[int] = None
    verifier: Any = None
    answer_key: str = "answer"
    success_threshold: float = 1.0
    kwargs: dict = field(default_factory=dict)

    def prompts(self, records: list) -> list:
        """One PromptItem (record, prompt_text, prompt_ids [P]) per record, formatted like the default rollout."""
        from rfpo_megatron.data.batching import build_prompts

        return build_prompts(records, self.tokenizer, self.prompt_format, self.max_prompt_len)

    def decode(self, ids: list) -> str:
        """Text of token ids, special tokens dropped (what the verifier reads)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def verify(self, text: str, record: dict) -> Any:
        """The verifier's RewardResult (reward, message) for `text` as a response to `record`."""
        from rfpo_megatron.rewards import score_many

        return score_many(self.verifier, [(text, str(record.get(self.answer_key, "")), record)])[0]

    def env_turn_ids(self, reply: str, model_turn_ids: list, finish_reason: str) -> list:
        """[E] ids that follow a model turn (ids `model_turn_ids`, ended by `finish_reason`): the turn's close,
        `reply` as a user turn, the next generation prompt (rfpo_megatron.data.template.env_turn_text)."""
        tail = ""
        if finish_reason == "stop" and model_turn_ids:
            tail = self.tokenizer.decode([int(model_turn_ids[-1])], skip_special_tokens=False)
        return encode_env_turn(self.tokenizer, reply, self.prompt_format, tail)


def load_callable(spec: str, field_name: str) -> Callable:
    """The function named by "pkg.module:fn" or "path/file.py:fn"; GenerateFnError (one line, naming
    `field_name` and the spec) when the file, module or name is missing or not callable."""
    where, sep, name = str(spec).rpartition(":")
    head = f"{field_name} '{spec}'"
    if not sep or not where or not name.isidentifier():
        raise GenerateFnError(f"{head}: write 'pkg.module:fn' or 'path/file.py:fn'")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise GenerateFnError(f"{head}: file '{where}' not found (relative paths start at the working "
                                  f"directory {os.getcwd()})")
        mod_name = "rfpo_user_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module  # pickling (multi-rank broadcast) of objects defined there works
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[mod_name]
                raise GenerateFnError(f"{head}: importing '{where}' failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise GenerateFnError(f"{head}: cannot import module '{where}' ({type(exc).__name__}: {exc}); put it "
                                  "on PYTHONPATH or give a file path 'path/file.py:fn'") from exc
    fn = getattr(module, name, None)
    if fn is None:
        names = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise GenerateFnError(f"{head}: '{where}' has no '{name}' (callables there: {', '.join(names) or 'none'})")
    if not callable(fn):
        raise GenerateFnError(f"{head}: '{name}' is a {type(fn).__name__}, not a function")
    return fn


def check_signature(fn: Callable, spec: str, field_name: str, args: tuple) -> None:
    """GenerateFnError unless `fn` can be called with len(args) positional arguments named like `args`."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: checked when called
    try:
        sig.bind(*args)
    except TypeError:
        raise GenerateFnError(f"{field_name} '{spec}': {getattr(fn, '__name__', spec)}{sig} must accept "
                              f"({', '.join(args)}); change its signature to def fn({', '.join(args)})") from None
