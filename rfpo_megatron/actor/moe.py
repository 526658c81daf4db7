"""MoE settings of the actor: megatron config fields from ``actor.*``, and the step normalisation of the router losses.

Megatron adds the load-balancing loss (``moe_router_load_balancing_type="aux_loss"``) and the z-loss of every MoE
layer through ``MoEAuxLossAutoScaler``. With ``calculate_per_token_loss`` (which the actor uses) megatron 0.16.1
multiplies each micro-batch's loss by the router's local token rows T_mb and sets the backward scale to 1
instead of 1 / num_microbatches (pipeline_parallel/schedules.py, ``forward_step_calc_loss``), expecting
``finalize_model_grads`` to divide every gradient by the step's token count. The actor reports 0 tokens (its own
loss is already normalised by whole-step counts), so the router losses would enter the gradient as
Σ_mb T_mb · coef · aux_mb. `set_step_tokens` divides the coefficients by the step's router rows
T_step = Σ_{DP ranks, micro-batches} T_mb once per step, so the gradient is that of

    coef · Σ_mb (T_mb / T_step) · aux_mb          (a token-weighted mean over the whole step)

which, like the policy loss, does not depend on how the step is split into micro-batches or DP ranks when the
micro-batches' aux losses are equal (the only case where any split can be invariant: aux_mb is a product of
micro-batch means). The coefficient is read by the router at forward time, and T_step is one number per step,
so pipelining and activation recomputation see the same value.
"""
from __future__ import annotations

from typing import Any

import torch

from rfpo_megatron.config import ConfigError


def moe_overrides(cfg: Any, arch: Any) -> dict[str, Any]:
    """TransformerConfig overrides from ``actor.*`` for a MoE arch ({} for a dense one).

    The coefficients given here are the base values; `set_step_tokens` scales them per step.
    """
    if not arch.is_moe:
        return {}
    aux = cfg.moe_aux_loss_coef
    aux = arch.router_aux_loss_coef if aux is None else float(aux)
    return dict(moe_token_dispatcher_type=cfg.moe_token_dispatcher_type, moe_aux_loss_coeff=float(aux),
                moe_z_loss_coeff=None if cfg.moe_z_loss_coef is None else float(cfg.moe_z_loss_coef))


def check_moe_layout(cfg: Any, arch: Any, tp: int, sequence_parallel: bool) -> None:
    """ConfigError for layouts whose router losses megatron would scale wrongly or refuse."""
    if not arch.is_moe:
        if cfg.expert_model_parallel_size != 1:
            raise ConfigError(f"actor.expert_model_parallel_size={cfg.expert_model_parallel_size} needs a MoE model; "
                              f"model_type={arch.model_type!r} is dense (set it to 1)")
        return
    if cfg.moe_token_dispatcher_type == "allgather" and cfg.expert_model_parallel_size > 1:
        raise ConfigError("actor.moe_token_dispatcher_type='allgather' needs actor.expert_model_parallel_size=1: "
                          "megatron's allgather dispatcher gathers equal-size token blocks over the EP group, and "
                          "the actor's micro-batches differ in length across data-parallel ranks; use 'alltoall'")
    if tp > 1 and not sequence_parallel:
        raise ConfigError("actor.sequence_parallel must be true for a MoE model with actor.tensor_model_parallel_size "
                          f"={tp} (megatron's router counts tokens over the TP group, and with experts spread over "
                          "ranks megatron requires it)")


class StepRouterLoss:
    """Per-step coefficient scaling and the ``train/moe_*`` metrics of one model's MoE routers.

    base: the configured coefficients ({"moe_aux_loss_coeff": c, "moe_z_loss_coeff": z or None}); configs: the
    TransformerConfig object(s) the routers read (one per model chunk; usually the same object).
    """

    def __init__(self, configs: list, seq_multiple: int) -> None:
        self.configs = configs
        self.base = {k: getattr(configs[0], k) for k in ("moe_aux_loss_coeff", "moe_z_loss_coeff")}
        self.seq_multiple = int(seq_multiple)
        self.num_moe_layers = sum(1 for f in _layer_pattern(configs[0]) if f)

    def set_step_tokens(self, micro_batches: list, *, real: bool) -> None:
        """Scale the coefficients by 1 / T_step (collective over DP). real=False: this DP rank runs only a
        placeholder micro-batch, whose router losses get coefficient 0."""
        from rfpo_megatron.actor.forward import dp_sum
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        rows = sum(int(mb.input_ids.numel()) for mb in micro_batches) // self.seq_multiple if real else 0
        counts = torch.tensor([float(rows), float(len(micro_batches) if real else 0)], dtype=torch.float64,
                              device=_device())
        dp_sum(counts)
        self.step_rows, self.step_micro_batches = float(counts[0]), float(counts[1])
        for key, value in self.base.items():
            if value is None:
                continue
            if real and self.step_rows > 0:
                scaled = float(value) / self.step_rows
            else:  # no router loss from a placeholder (z-loss: None, since megatron logs z / coef)
                scaled = 0.0 if key == "moe_aux_loss_coeff" else None
            for c in self.configs:
                setattr(c, key, scaled)
        clear_aux_losses_tracker()

    def metrics(self) -> dict[str, float]:
        """``train/moe_aux_loss`` (and ``train/moe_z_loss`` when on): megatron's per-layer router loss without
        its coefficient, averaged over the MoE layers and the step's micro-batches (collective over TP, PP, DP)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as mpu
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        from rfpo_megatron.actor.forward import dp_sum

        names = []  # (metric, megatron tracker key) of the losses that are on
        if (self.base["moe_aux_loss_coeff"] or 0.0) > 0:
            names.append(("train/moe_aux_loss", "load_balancing_loss"))
        if self.base["moe_z_loss_coeff"] is not None:
            names.append(("train/moe_z_loss", "z_loss"))
        if not names:
            return {}
        tracker = get_moe_layer_wise_logging_tracker()
        acc = torch.zeros(len(names), dtype=torch.float64, device=_device())
        for i, (_, key) in enumerate(names):
            if key in tracker:  # per layer, summed over this rank's micro-batches
                acc[i] = tracker[key]["values"].double().sum()
        tp = mpu.get_tensor_model_parallel_world_size()
        if self.configs[0].sequence_parallel and tp > 1:
            # each TP rank holds its sequence shard's part of the load-balancing loss; megatron's z-loss on a
            # rank is already its shard's mean (summed over TP, then divided by TP)
            dist.all_reduce(acc, group=mpu.get_tensor_model_parallel_group())
            for i, (_, key) in enumerate(names):
                if key == "z_loss":
                    acc[i] /= tp
        if mpu.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(acc, group=mpu.get_pipeline_model_parallel_group())  # layers live on their stages
        dp_sum(acc)
        denom = max(self.step_micro_batches, 1.0) * max(self.num_moe_layers, 1)
        return {name: float(v) / denom for (name, _), v in zip(names, acc.tolist())}


def equal_microbatch_count(groups: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Split this DP rank's micro-batches (lists of sample positions) until every DP rank has as many.

    With expert parallelism every MoE layer runs an all-to-all over the EP group, which spans data-parallel
    ranks, so all of them must run the same number of forwards. The largest (in tokens) micro-batch of two
    or more samples is halved until the count reaches the DP group's maximum (collective over DP); only real
    samples are used, so the step's result is unchanged. ValueError when this rank has too few samples
    (lower actor.max_tokens_per_gpu / micro_batch_size so every rank gets as many micro-batches).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    groups = [list(g) for g in groups]
    if mpu.get_data_parallel_world_size() > 1:
        n = torch.tensor([len(groups)], dtype=torch.int64, device=_device())
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=mpu.get_data_parallel_group())
        target = int(n)
    else:
        target = len(groups)
    while len(groups) < target:
        splittable = [g for g in groups if len(g) > 1]
        if not splittable:
            raise ValueError(
                f"expert parallelism needs {target} micro-batches on every data-parallel rank, but this rank has "
                f"only {sum(len(g) for g in groups)} samples; use a larger batch or a smaller "
                "actor.max_tokens_per_gpu / micro_batch_size")
        big = max(splittable, key=lambda g: sum(lengths[i] for i in g))
        at = groups.index(big)
        groups[at:at + 1] = [big[: len(big) // 2], big[len(big) // 2:]]
    return groups


def _layer_pattern(config) -> list[int]:
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return list(freq)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
