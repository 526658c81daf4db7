"""The built-in multi-turn rollout (`rollout.generate_fn: multi_turn`): the environment replies after each model turn.

A dialogue of prompt q: model turn a_1, environment reply e_1, a_2, e_2, ..., a_K (K <= max_turns). The environment
ends the dialogue early by returning None. One Sample per dialogue:

    prompt_ids   [P]  q
    response_ids [T]  a_1 e_1 a_2 ... a_K (each e_k includes the close of the previous turn and the next
                      generation prompt; rfpo_megatron.data.template.env_turn_text)
    loss_mask    [T]  1 on the a_k tokens (trained), 0 on the e_k tokens (never in the loss)
    rollout_logprobs [T] the engine's log-probs on a_k tokens, 0.0 on e_k tokens
    response_text     a_K decoded: the verifier scores the final turn

Environment (`rollout.generate_kwargs.env_fn`): null = the verifier -- a correct turn (reward >=
rfpo.fix.success_threshold) ends the dialogue, a wrong one gets `feedback_template` filled with {message} (the
verifier's message) -- or "pkg.module:fn" / "path/file.py:fn", `env(record, turns) -> str | None` with `turns`
the model's turn texts so far. A reply is cut to its first `max_env_tokens` tokens (the turn markup
around it is not counted).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rfpo_megatron.config import ConfigError
from rfpo_megatron.data.types import RolloutGroup, Sample
from rfpo_megatron.train.rollout_fn import RolloutContext, check_signature, load_callable

ENV_ARGS = ("record", "turns")


@dataclass
class MultiTurnConfig:
    """rollout.generate_kwargs of generate_fn=multi_turn (see the module docstring)."""

    max_turns: int = 3
    env_fn: Optional[str] = None
    feedback_template: str = "{message}"
    max_env_tokens: int = 64

    @classmethod
    def from_kwargs(cls, kwargs: dict, load: bool = True) -> "MultiTurnConfig":
        """Validated from rollout.generate_kwargs (ConfigError naming rollout.generate_kwargs.<key>)."""
        names = [f.name for f in dataclasses.fields(cls)]
        for k in kwargs or {}:
            if k not in names:
                raise ConfigError(f"config field 'rollout.generate_kwargs.{k}' is unknown for generate_fn=multi_turn; "
                                  f"use {', '.join(names)}")
        out = cls(**dict(kwargs or {}))
        for k in ("max_turns", "max_env_tokens"):
            v = getattr(out, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"config field 'rollout.generate_kwargs.{k}': {v!r} must be an integer >= 1")
        if not isinstance(out.feedback_template, str) or "{message}" not in out.feedback_template:
            raise ConfigError("config field 'rollout.generate_kwargs.feedback_template' must be a string containing "
                              "{message} (the verifier's message)")
        if out.env_fn is not None and load:
            check_signature(load_callable(out.env_fn, "rollout.generate_kwargs.env_fn"), out.env_fn,
                            "rollout.generate_kwargs.env_fn", ENV_ARGS)
        return out


@dataclass
class Dialogue:
    """One dialogue being generated: response_ids/loss_mask/logprobs [T] grow turn by turn."""

    record: dict
    prompt_ids: list
    response_ids: list = field(default_factory=list)
    loss_mask: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    turns: list = field(default_factory=list)  # the model's turn texts
    last_turn: list = field(default_factory=list)  # ids of the latest model turn
    finish: str = "stop"
    done: bool = False

    def add_model_turn(self, res: Any, ctx: RolloutContext) -> None:
        ids = [int(t) for t in res.output_ids]
        lp = list(res.logprobs or [])
        self.response_ids += ids
        self.loss_mask += [1] * len(ids)
        self.logprobs += lp if len(lp) == len(ids) else [0.0] * len(ids)
        self.turns.append(ctx.decode(ids))
        self.last_turn, self.finish = ids, str(res.finish_reason)
        self.done = self.finish == "abort" or not ids

    def add_env_turn(self, ids: list) -> None:
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def sample(self) -> Sample:
        return Sample(prompt_ids=list(self.prompt_ids), response_ids=list(self.response_ids),
                      rollout_logprobs=list(self.logprobs), finish_reason=self.finish, record=self.record,
                      response_text=self.turns[-1] if self.turns else "", loss_mask=list(self.loss_mask))


def verifier_env(ctx: RolloutContext, template: str) -> Callable[[dict, list], Optional[str]]:
    """The default environment: None (done) when the last turn is correct, else the verifier's message."""
    def env(record: dict, turns: list) -> Optional[str]:
        res = ctx.verify(turns[-1], record)
        if float(res.reward) >= ctx.success_threshold:
            return None
        return template.format(message=res.message or "the answer is incorrect")

    return env


def generate(engine: Any, records: list, params: Any, ctx: RolloutContext) -> list[RolloutGroup]:
    """params.n dialogues per record (turn 1 batched as n samples per prompt, later turns one request per
    open dialogue), the environment replying between turns; one RolloutGroup per record."""
    from rfpo_megatron.rollout.base import derive_seed

    mt = MultiTurnConfig.from_kwargs(ctx.kwargs)
    env = verifier_env(ctx, mt.feedback_template) if mt.env_fn is None else load_callable(
        mt.env_fn, "rollout.generate_kwargs.env_fn")
    items = ctx.prompts(records)
    first = engine.generate([it.prompt_ids for it in items], params)
    groups = [[Dialogue(it.record, list(it.prompt_ids)) for _ in res] for it, res in zip(items, first)]
    for ds, res in zip(groups, first):
        for d, r in zip(ds, res):
            d.add_model_turn(r, ctx)
    flat = [d for ds in groups for d in ds]
    for turn in range(2, mt.max_turns + 1):
        open_ = []
        for d in (d for d in flat if not d.done):
            reply = env(d.record, list(d.turns))
            if reply is None:
                d.done = True
                continue
            if not isinstance(reply, str):
                raise ConfigError(f"rollout.generate_kwargs.env_fn '{mt.env_fn}' returned {type(reply).__name__}; "
                                  "return the reply text (str) or None to end the dialogue")
            rid = ctx.tokenizer(reply, add_special_tokens=False)["input_ids"]
            if len(rid) > mt.max_env_tokens:  # cut the reply itself; the turn markup around it stays whole
                reply = ctx.tokenizer.decode(rid[: mt.max_env_tokens], skip_special_tokens=True)
            d.add_env_turn(ctx.env_turn_ids(reply, d.last_turn, d.finish))
            open_.append(d)
        if not open_:
            break
        seed = None if params.seed is None else derive_seed(params.seed, 1_000_000 + turn, 0)
        outs = engine.generate([d.prompt_ids + d.response_ids for d in open_],
                               dataclasses.replace(params, n=1, seed=seed))
        for d, res in zip(open_, outs):
            d.add_model_turn(res[0], ctx)
    return [RolloutGroup(prompt_ids=list(it.prompt_ids), samples=[d.sample() for d in ds], record=it.record,
                         prompt_text=it.prompt_text) for it, ds in zip(items, groups)]
