"""Partial rollout: generations aborted by a weight sync are resumed with the new weights, segment by segment.

SGLang's protocol (0.5.23, the wheel of tools/fetch_sglang_ref.py; file:line in docs/rollout.md): the trainer
calls /pause_generation (mode "abort"): every running request returns at once with the tokens and log-probs it
has, finish_reason abort; the weights are updated; /continue_generation lets requests in again. The request is
then re-submitted as prompt + tokens so far with the remaining token budget (what slime does), so the new
weights recompute the prefix and write the rest. Each segment's tokens keep the log-probs and the weight
version (meta_info.weight_version, set by the update's `weight_version`) of the weights that produced them.

`ResumingEngine` wraps an EngineClient: its `generate` is `generate_resumable`, everything else is the client's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .base import FINISH_ABORT, FINISH_LENGTH, GenerateResult, SamplingParams, derive_seed

MAX_SEGMENTS = 64  # resubmissions of one sample before it is returned as aborted (a sync per segment at most)


def version_of(meta: dict) -> int:
    """meta_info.weight_version as an int: the trainer step whose weights produced the tokens (0 for the start
    weights, which SGLang and the embedded engine call "default")."""
    v = str(meta.get("weight_version", "") or "")
    return int(v) if v.lstrip("-").isdigit() else 0


def token_versions(res: GenerateResult) -> list[int]:
    """[L] weight version of each output token: the segments recorded by generate_resumable, else SGLang's
    meta_info.weight_versions spans ({version, start, end}: in_place / retract pauses), else one version."""
    if "token_versions" in res.meta:
        return list(res.meta["token_versions"])
    spans = res.meta.get("weight_versions")
    out = [version_of(res.meta)] * len(res.output_ids)
    for sp in spans or []:
        v = version_of({"weight_version": sp.get("version")})
        for t in range(int(sp.get("start", 0)), min(int(sp.get("end", 0)), len(out))):
            out[t] = v
    return out


def generate_resumable(engine: Any, prompts: list[list[int]], params: SamplingParams,
                       stopping: Callable[[], bool] = lambda: False) -> list[list[GenerateResult]]:
    """engine.generate(prompts, params), then every sample that ended in abort is re-submitted as
    prompt + its tokens so far (n=1, the remaining max_new_tokens) until it ends otherwise (or `stopping()`,
    or MAX_SEGMENTS). out[i][j] concatenates the segments: output_ids [L], logprobs [L], the last segment's
    finish reason, meta["token_versions"] [L] and meta["segments"]."""
    results = engine.generate(prompts, params)
    for r in (r for row in results for r in row):
        r.meta["token_versions"] = token_versions(r)
        r.meta["segments"] = 1
    for round_ in range(1, MAX_SEGMENTS):
        todo = [(i, j) for i, row in enumerate(results) for j, r in enumerate(row)
                if r.finish_reason == FINISH_ABORT and len(r.output_ids) < params.max_new_tokens]
        if not todo or stopping():
            break
        seed = None if params.seed is None else derive_seed(params.seed, 1_000_000 + round_, 0)
        more = _resubmit(engine, prompts, results, todo, params, seed)
        for (i, j), seg in zip(todo, more):
            results[i][j] = _join(results[i][j], seg[0])
    for r in (r for row in results for r in row):  # aborted exactly at the budget: the budget ended it
        if r.finish_reason == FINISH_ABORT and len(r.output_ids) >= params.max_new_tokens:
            r.finish_reason = FINISH_LENGTH
    return results


def _resubmit(engine: Any, prompts, results, todo, params: SamplingParams, seed) -> list[list[GenerateResult]]:
    """One generate call per remaining budget (a call has one max_new_tokens for all its prompts)."""
    out: list[Any] = [None] * len(todo)
    by_budget: dict[int, list[int]] = {}
    for k, (i, j) in enumerate(todo):
        by_budget.setdefault(params.max_new_tokens - len(results[i][j].output_ids), []).append(k)
    for budget, ks in sorted(by_budget.items()):
        got = engine.generate([list(prompts[todo[k][0]]) + list(results[todo[k][0]][todo[k][1]].output_ids)
                               for k in ks],
                              dataclasses.replace(params, n=1, seed=None if seed is None else derive_seed(seed, budget, 0),
                                                  max_new_tokens=budget))
        for k, g in zip(ks, got):
            out[k] = g
    return out


def _join(head: GenerateResult, tail: GenerateResult) -> GenerateResult:
    """head's segments followed by tail's tokens (tail was generated from prompt + head.output_ids)."""
    meta = dict(tail.meta)
    meta["token_versions"] = list(head.meta["token_versions"]) + token_versions(tail)
    meta["segments"] = int(head.meta.get("segments", 1)) + 1
    return GenerateResult(output_ids=list(head.output_ids) + list(tail.output_ids),
                          logprobs=list(head.logprobs) + list(tail.logprobs), finish_reason=tail.finish_reason,
                          meta=meta)


class ResumingEngine:
    """An EngineClient whose generate resumes aborted samples (generate_resumable); the rest is the client's."""

    def __init__(self, engine: Any, stopping: Callable[[], bool] = lambda: False):
        self._engine, self._stopping = engine, stopping

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[GenerateResult]]:
        return generate_resumable(self._engine, prompts, params, self._stopping)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)
