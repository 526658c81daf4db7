"""Custom rollout functions (`rollout.generate_fn`): load one by name or path, call it, check what it returns.

    generate_fn(engine, records, params, ctx) -> list[RolloutGroup]     one group per record, in record order

engine:  the EngineClient (`engine.generate(prompts [B][P_i] token ids, SamplingParams) -> [B][n] GenerateResult`).
records: the step's dataset records (dicts: prompt, answer, any extra fields).
params:  the step's SamplingParams (n = rollout.n_samples, seed, temperature, max_new_tokens, stop ids).
ctx:     a RolloutContext: tokenizer, prompt encoding, the verifier, env-turn encoding, rollout.generate_kwargs.

Each Sample needs prompt_ids [P], response_ids [T], optionally rollout_logprobs [T] and loss_mask [T] (0 on
environment tokens). The trainer scores every returned sample with data.reward_fn on `response_text` (decoded
from the final model turn when left empty), so rewards set by the function are overwritten.
Specs: a built-in name (multi_turn), "pkg.module:fn", or "path/file.py:fn" (relative to the working directory).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from rfpo_megatron.config import BUILTIN_GENERATE_FNS, ConfigError
from rfpo_megatron.data.types import RolloutGroup, Sample
from rfpo_megatron.train.rollout_fn import GenerateFnError, RolloutContext, check_signature, load_callable

BUILTINS = {"multi_turn": "rfpo_megatron.train.multi_turn:generate"}
assert tuple(BUILTINS) == BUILTIN_GENERATE_FNS
GENERATE_ARGS = ("engine", "records", "params", "ctx")


def load_generate_fn(spec: str) -> Callable:
    """rollout.generate_fn -> the function (built-in name or path), its signature checked."""
    fn = load_callable(BUILTINS.get(spec, spec), "rollout.generate_fn")
    check_signature(fn, spec, "rollout.generate_fn", GENERATE_ARGS)
    return fn


def validate_generate_fn(spec: Optional[str], kwargs: dict, load: bool = True) -> None:
    """Set-up check: the spec loads with the right signature (`load`) and a built-in's kwargs are valid."""
    if spec is None:
        if kwargs:
            raise ConfigError("config field 'rollout.generate_kwargs' is set but rollout.generate_fn is null; "
                              "set rollout.generate_fn or drop the kwargs")
        return
    if spec == "multi_turn":
        from rfpo_megatron.train.multi_turn import MultiTurnConfig

        MultiTurnConfig.from_kwargs(kwargs, load=load)
    if load:
        load_generate_fn(spec)


def check_groups(out: Any, records: list, spec: str) -> list[RolloutGroup]:
    """`out` as a list of RolloutGroup, one per record, with well-formed samples; GenerateFnError naming the
    function and what to return otherwise."""
    head = f"rollout.generate_fn '{spec}'"
    want = "return a list of rfpo_megatron.data.types.RolloutGroup, one per record, in record order"
    if not isinstance(out, (list, tuple)):
        raise GenerateFnError(f"{head} returned {type(out).__name__}; {want}")
    if len(out) != len(records):
        raise GenerateFnError(f"{head} returned {len(out)} groups for {len(records)} records; {want}")
    for gi, g in enumerate(out):
        if not isinstance(g, RolloutGroup):
            raise GenerateFnError(f"{head}: group {gi} is a {type(g).__name__}; {want}")
        if not g.samples:
            raise GenerateFnError(f"{head}: group {gi} has no samples; give each group at least one Sample")
        for si, s in enumerate(g.samples):
            at = f"{head}: group {gi} sample {si}"
            if not isinstance(s, Sample):
                raise GenerateFnError(f"{at} is a {type(s).__name__}; use rfpo_megatron.data.types.Sample")
            if not s.prompt_ids or not s.response_ids:
                raise GenerateFnError(f"{at} has empty prompt_ids or response_ids; both must be token id lists")
            if not all(isinstance(t, int) for t in list(s.prompt_ids) + list(s.response_ids)):
                raise GenerateFnError(f"{at}: prompt_ids/response_ids must be lists of int token ids")
            T = len(s.response_ids)
            if s.loss_mask is not None and len(s.loss_mask) != T:
                raise GenerateFnError(f"{at}: loss_mask has {len(s.loss_mask)} entries for {T} response tokens")
            if s.rollout_logprobs and len(s.rollout_logprobs) != T:
                raise GenerateFnError(f"{at}: rollout_logprobs has {len(s.rollout_logprobs)} entries for {T} "
                                      "response tokens (give one per token, or none)")
            if s.is_fixed:
                raise GenerateFnError(f"{at} is marked is_fixed; fixes come from the fix stage (rfpo.enabled)")
        if not g.prompt_ids:
            g.prompt_ids = list(g.samples[0].prompt_ids)
        if not g.record:
            g.record = records[gi]
    return list(out)


def run_generate_fn(fn: Callable, spec: str, engine: Any, records: list, params: Any,
                    ctx: RolloutContext) -> list[RolloutGroup]:
    """Call the generate_fn and check its groups; samples without response_text get the final model turn decoded,
    samples without a record get their group's."""
    groups = check_groups(fn(engine, records, params, ctx), records, spec)
    for g in groups:
        for s in g.samples:
            if not s.record:
                s.record = g.record
            if not s.response_text:
                s.response_text = ctx.decode(s.response_ids[s.final_turn_start:])
    return groups
