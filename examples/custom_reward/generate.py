"""A user rollout function outside the package: answer, and when the answer is not in the `ans=` format,
get one reminder from the environment and answer again (a two-turn dialogue).

Signature: generate(engine, records, params, ctx) -> list[RolloutGroup], one group per record.
  engine  EngineClient: engine.generate(prompt ids [B][P_i], SamplingParams) -> [B][n] GenerateResult
  records the step's dataset records; params: SamplingParams (params.n responses per prompt)
  ctx     RolloutContext: prompts(records), decode(ids), verify(text, record), env_turn_ids(reply, turn_ids,
          finish_reason), kwargs (= rollout.generate_kwargs)
Each Sample: prompt_ids [P], response_ids [T] (all turns), rollout_logprobs [T], loss_mask [T] (1 = the model's
token, trained; 0 = the environment's, never in the loss). The trainer scores `response_text` (set it to the final
turn) with data.reward_fn.
"""
from __future__ import annotations

import dataclasses

from rfpo_megatron.data.types import RolloutGroup, Sample


def generate(engine, records, params, ctx):
    reminder = ctx.kwargs.get("reminder", "End with ans=<number>.")
    items = ctx.prompts(records)
    first = engine.generate([it.prompt_ids for it in items], params)
    dialogues = [[{"ids": list(r.output_ids), "mask": [1] * len(r.output_ids), "logp": list(r.logprobs),
                   "last": r} for r in res] for res in first]
    retry = [(it, d) for it, ds in zip(items, dialogues) for d in ds if "ans=" not in ctx.decode(d["last"].output_ids)]
    for _, d in retry:  # the environment's reply: masked out of the loss
        env = ctx.env_turn_ids(reminder, d["last"].output_ids, d["last"].finish_reason)
        d["ids"] += env
        d["mask"] += [0] * len(env)
        d["logp"] += [0.0] * len(env)
    if retry:
        outs = engine.generate([it.prompt_ids + d["ids"] for it, d in retry], dataclasses.replace(params, n=1))
        for (_, d), res in zip(retry, outs):
            r = res[0]
            d["ids"] += list(r.output_ids)
            d["mask"] += [1] * len(r.output_ids)
            d["logp"] += list(r.logprobs)
            d["last"] = r
    return [RolloutGroup(prompt_ids=list(it.prompt_ids), record=it.record, prompt_text=it.prompt_text,
                         samples=[Sample(prompt_ids=list(it.prompt_ids), response_ids=d["ids"], loss_mask=d["mask"],
                                         rollout_logprobs=d["logp"], finish_reason=d["last"].finish_reason,
                                         record=it.record, response_text=ctx.decode(d["last"].output_ids))
                                  for d in ds])
            for it, ds in zip(items, dialogues)]
