"""Rollout routing replay (R3): force megatron's MoE routers to the rollout engine's top-k experts.

Megatron-core 0.16.1 has a router-replay hook (``transformer/moe/router_replay.py``): every ``TopKRouter``
passes its ``router_replay`` object to ``topk_routing_with_score_function``, which calls
``router_replay.get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)`` instead of
its own top-k. In replay mode megatron takes the forced indices and gathers the router's own ``scores``
at them: for Qwen3-MoE (softmax after top-k, ``moe_router_pre_softmax=False``) those are the router
logits, softmaxed over the k forced experts afterwards — the gating weights are recomputed from the
training router's own logits at the rollout's experts and normalised as the router normalises its own
choice (HF ``norm_topk_prob=True``); with pre-softmax routing they are the full-softmax probabilities at
those experts. Gradients flow into the router weights through those gathered logits.

This module uses that hook with its own ``RouterReplay`` stand-in (``RolloutReplay``) instead of the
config switch ``moe_enable_routing_replay`` (whose instances live in one process-global list shared by
every model of the process): one instance per router, installed by ``install``, which

* takes a per-token target ``[n_tokens, k]`` where ``-1`` rows keep the router's own choice (tokens the
  engine returned no routing for: the last token of every sequence, padding, samples without routing);
* always computes the router's own top-k too, and counts (token, layer) pairs whose own top-k *set*
  differs from the target, over the tokens of ``count_mask`` — ``train/router_replay_mismatch``;
* forces the targets only when ``replay=True`` (``actor.router_replay: rollout``); with ``off`` it only
  measures.

Token order. A router sees ``[s, b]`` flattened sequence-major (``logits.view(-1, E)`` of ``[s, b, E]``):
token (batch row bi, position t) is row ``t * b + bi``; packed THD micro-batches have b = 1. With sequence
parallelism each TP rank sees its contiguous ``s / tp`` slice. ``microbatch_targets`` builds the target of a
packed micro-batch from SGLang-layout routing (``[L_i - 1, num_layers, k]`` per sample, row p = the token
at position p, see docs/rollout.md); each router reads its global layer ``layer_number - 1``.

Prompt tokens are replayed too (the engine returns them; they shape every response token's attention
context); the mismatch counts the response-scoring rows (position P - 1 … L - 2, the rows whose logits
give the response log-probs, one per response token).

Activation recomputation re-runs a layer's forward in the backward pass. Without pipelining megatron runs each
micro-batch's backward right after its forward, so the targets are still that micro-batch's and the re-run routes
the same way (counted once: only the first routing after ``set_target``); with PP > 1 the 1F1B schedule runs
later forwards first, so the actor refuses ``actor.recompute`` with replay there.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

NO_TARGET = -1  # a target row of -1: the router keeps its own top-k for that token


class RolloutReplay:
    """One router's replay state, in the place of megatron's ``RouterReplay`` (the same ``get_replay_topk``
    hook; not registered in megatron's process-global instance list).

    target: [n, k] int64 expert ids per token in the router's token order, -1 rows = own routing; None = off.
    count_mask: [n] bool, tokens counted in the mismatch statistics (None = none).
    replay: force the target (True) or only measure against it (False).
    layer: the router's global layer index (``layer_number - 1``), the column of SGLang's routing array.
    """

    def __init__(self, layer: int, replay: bool):
        self.layer = int(layer)
        self.replay = bool(replay)
        self.target: Optional[torch.Tensor] = None
        self.count_mask: Optional[torch.Tensor] = None
        self.mismatched = 0
        self.counted = 0
        self._fresh = False  # the next routing is the first since set_target (recomputation re-runs are not counted)
        self.last_own: Optional[torch.Tensor] = None  # [n, k] own top-k of the last forward
        self.last_used: Optional[torch.Tensor] = None  # [n, k] the experts the last forward dispatched to

    def set_target(self, target: Optional[torch.Tensor], count_mask: Optional[torch.Tensor]) -> None:
        self.target = target
        self.count_mask = count_mask
        self._fresh = True

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        """Megatron's hook: (values [n, k], indices [n, k]) of the experts each token is dispatched to."""
        vals, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        self.last_own = own.detach()
        self.last_used = self.last_own
        if self.target is None:
            return vals, own
        tgt = self.target.to(device=scores.device, dtype=own.dtype)
        if tuple(tgt.shape) != tuple(own.shape):
            raise ValueError(
                f"router replay (layer {self.layer}): target of shape {tuple(tgt.shape)} for {tuple(own.shape)} "
                "routed tokens x top-k; the routing must come from the same model (num_experts_per_tok, layers) "
                "and cover the sequence as SGLang's routed_experts does (prompt + response - 1 rows)"
            )
        have = (tgt >= 0).all(dim=-1)
        if self.count_mask is not None and self._fresh:
            sel = have & self.count_mask.to(device=have.device)
            diff = (own.sort(dim=-1).values != tgt.sort(dim=-1).values).any(dim=-1)
            self.mismatched += int((diff & sel).sum())
            self.counted += int(sel.sum())
        self._fresh = False
        if not self.replay:
            return vals, own
        idx = torch.where(have[:, None], tgt, own)
        self.last_used = idx.detach()
        return scores.gather(1, idx), idx


def _routers(model: torch.nn.Module) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    while hasattr(model, "module"):
        model = model.module
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def install(model_chunks: Sequence[torch.nn.Module], replay: bool) -> list[RolloutReplay]:
    """Give every ``TopKRouter`` of the chunks a ``RolloutReplay``; returns them (model order).

    replay: ``actor.router_replay == "rollout"`` (force), else measure only. Idempotent: a second call
    replaces the instances. A model without MoE layers returns [].
    """
    out = []
    for chunk in model_chunks:
        for r in _routers(chunk):
            if r.config.moe_router_num_groups or r.config.moe_expert_capacity_factor is not None:
                raise ValueError("actor.router_replay needs plain top-k routing (no group-limited routing, no "
                                 "expert capacity / token dropping): a replayed expert could be dropped")
            r.router_replay = RolloutReplay(int(r.layer_number) - 1, replay)
            out.append(r.router_replay)
    return out


def instances(model: torch.nn.Module) -> list[RolloutReplay]:
    """The installed ``RolloutReplay`` objects of one model chunk (model order)."""
    return [r.router_replay for r in _routers(model) if isinstance(r.router_replay, RolloutReplay)]


def microbatch_targets(
    routed: Sequence[Optional[torch.Tensor]],
    lengths: Sequence[int],
    prompt_lens: Sequence[int],
    *,
    layout: str,
    seq_len: int,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Router targets of one packed micro-batch.

    routed[i]: [>= L_i - 1, num_layers, k] int expert ids of sample i, row p = the token at position p
    (SGLang's routed_experts with routed_experts_start_len=0; only the first L_i - 1 rows are read, the
    last token of a sequence is never fed to the engine), or None (own routing for the whole sample).
    lengths, prompt_lens: L_i and P_i of the micro-batch's samples, in packing order.
    layout / seq_len: as ``packing.pack_microbatch`` built it ("pad": [b, seq_len]; "thd": [1, seq_len]).

    Returns (target [seq_len * b, num_layers, k] int64 in the routers' sequence-major token order, -1 where
    there is no routing; count [seq_len * b] bool, the response-scoring rows P_i - 1 … L_i - 2);
    (None, None) when no sample has routing.
    """
    first = next((torch.as_tensor(r) for r in routed if r is not None), None)
    if first is None:
        return None, None
    layers, topk = int(first.shape[1]), int(first.shape[-1])
    b = len(lengths) if layout == "pad" else 1
    target = torch.full((seq_len, b, layers, topk), NO_TARGET, dtype=torch.long)
    count = torch.zeros((seq_len, b), dtype=torch.bool)
    off = 0
    for i, (r, L, P) in enumerate(zip(routed, lengths, prompt_lens)):
        bi, start = (i, 0) if layout == "pad" else (0, off)
        if r is not None:
            r = torch.as_tensor(r)
            if r.dim() != 3 or r.shape[0] < L - 1 or r.shape[1] != layers or r.shape[2] != topk:
                raise ValueError(
                    f"routed_experts of micro-batch sample {i} has shape {tuple(r.shape)}; expected "
                    f"[{L - 1} (prompt + response - 1), {layers} layers, {topk} (num_experts_per_tok)]"
                )
            target[start: start + L - 1, bi] = r[: L - 1].long()
        count[start + P - 1: start + L - 1, bi] = True
        off += L
    return target.reshape(seq_len * b, layers, topk), count.reshape(seq_len * b)


def set_targets(model: torch.nn.Module, target: Optional[torch.Tensor], count: Optional[torch.Tensor],
                *, sequence_parallel: bool = False) -> None:
    """Point every ``RolloutReplay`` of one chunk at its layer's column of ``target`` ([n, layers, k]).

    With sequence parallelism each TP rank takes its contiguous token slice. None clears the targets.
    """
    reps = instances(model)
    if not reps:
        return
    if target is None:
        for rep in reps:
            rep.set_target(None, None)
        return
    if sequence_parallel:
        from megatron.core import parallel_state as mpu

        tp, rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
        n = target.shape[0] // tp
        target, count = target[rank * n:(rank + 1) * n], count[rank * n:(rank + 1) * n]
    for rep in reps:
        if rep.layer >= target.shape[1]:
            raise ValueError(f"routed_experts has {target.shape[1]} layers; the model has a router at layer {rep.layer}")
        rep.set_target(target[:, rep.layer], count)


def take_mismatch(model_chunks: Sequence[torch.nn.Module]) -> tuple[int, int]:
    """(mismatched, counted) (token, layer) pairs since the last call, this rank's routers; resets them."""
    mism = cnt = 0
    for chunk in model_chunks:
        for rep in instances(chunk):
            mism, cnt = mism + rep.mismatched, cnt + rep.counted
            rep.mismatched = rep.counted = 0
    return mism, cnt
