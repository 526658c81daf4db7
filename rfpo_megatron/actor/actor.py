"""Actor: megatron-core policy with a log-prob pass and a train step (registry loss, megatron optimizer, LR schedule).

Usage (every rank of the job, after ``init_parallel``)::

    actor = Actor(hf_config, actor_cfg, total_steps=100)
    logp, ent = actor.compute_logprobs(batch, compute_entropy=True)   # B x [R_i]
    batch.old_logp = logp
    metrics = actor.train_step(batch, algo_cfg)                        # train/* floats

Every rank passes the same whole ActorBatch. The actor splits it over
data-parallel ranks (balanced by tokens), packs micro-batches by
``max_tokens_per_gpu`` (or ``micro_batch_size``), and normalises the loss by the
whole step's token / sequence counts, so the update does not depend on the
split. The DP gradient reduction therefore SUMS (``calculate_per_token_loss``).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.distributed as dist

from rfpo_megatron.actor import router_replay
from rfpo_megatron.actor.batch import ActorBatch, pad_tokens
from rfpo_megatron.actor.forward import dp_sum, logprob_output_fn, pp_broadcast_from_last, run_schedule
from rfpo_megatron.actor.model import build_model, resolve_layout
from rfpo_megatron.actor.moe import StepRouterLoss, check_moe_layout, equal_microbatch_count, moe_overrides
from rfpo_megatron.actor.packing import PackedMicroBatch, make_microbatches, pack_microbatch, split_for_dp
from rfpo_megatron.algos.registry import get_policy_loss
from rfpo_megatron.config import ActorConfig
from rfpo_megatron.convert.arch import arch_from_hf_config

FUSED_LOSSES = ("ppo", "raft_pp")  # policy losses the fused token-loss kernel computes (kernels/loss.py)

METRIC_KEYS = (
    "train/loss",
    "train/pg_loss",
    "train/pg_clipfrac",
    "train/ppo_kl",
    "train/entropy",
    "train/kl_loss",
    "train/grad_norm",
    "train/lr",
)


def offload_settings(c: ActorConfig) -> dict:
    """megatron OptimizerConfig fields for ``actor.optimizer_cpu_offload`` (as megatron's own training sets them).

    Offload means megatron's HybridDeviceOptimizer with every optimizer state and fp32
    main param on the host (fraction 1.0), the precision-aware optimizer (so the device
    keeps no fp32 main-param shard), and overlapped d2h/h2d copies. It needs the
    distributed optimizer (``config.validate`` refuses offload without it).
    """
    if not c.optimizer_cpu_offload:
        return {}
    return dict(optimizer_cpu_offload=True, optimizer_offload_fraction=1.0, use_precision_aware_optimizer=True,
                overlap_cpu_optimizer_d2h_h2d=True)


def _cfg(obj: Any, name: str, default: Any = None) -> Any:
    return getattr(obj, name, default) if obj is not None else default


class Actor:
    """This rank's model chunks (DDP-wrapped), optimizer and LR scheduler.

    hf_config: HF config object or dict (see ``model.transformer_config_from_hf``).
    cfg: ``rfpo_megatron.config.ActorConfig`` (tp/pp must match ``init_parallel``).
    total_steps: optimizer steps of the run (LR decay horizon).
    temperature: sampling temperature; logits are divided by it before log-softmax.
    """

    def __init__(
        self,
        hf_config: Any,
        cfg: Optional[ActorConfig] = None,
        *,
        total_steps: int = 1,
        temperature: float = 1.0,
        spec: str = "auto",
        with_optimizer: bool = True,
        **model_overrides: Any,
    ) -> None:
        from megatron.core import parallel_state as mpu
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        self.cfg = cfg or ActorConfig()
        tp = mpu.get_tensor_model_parallel_world_size()
        pp = mpu.get_pipeline_model_parallel_world_size()
        if (self.cfg.tensor_model_parallel_size, self.cfg.pipeline_model_parallel_size) != (tp, pp):
            raise ValueError(
                f"actor.tensor_model_parallel_size={self.cfg.tensor_model_parallel_size}, "
                f"pipeline_model_parallel_size={self.cfg.pipeline_model_parallel_size} differ from "
                f"init_parallel(tp={tp}, pp={pp}); pass the same values"
            )
        vpp = getattr(self.cfg, "virtual_pipeline_model_parallel_size", None)
        if (vpp if vpp != 1 else None) != mpu.get_virtual_pipeline_model_parallel_world_size():
            raise ValueError(
                f"actor.virtual_pipeline_model_parallel_size={vpp} differs from init_parallel(vpp="
                f"{mpu.get_virtual_pipeline_model_parallel_world_size()}); pass the same value"
            )
        # context parallelism is refused by the config checks (config.validate)
        self.hf_config = hf_config
        self.on_gpu = torch.cuda.is_available()
        # actor.packing: packed THD sequences (TE attention, or the varlen core attention of the local spec) or pad
        self.layout = resolve_layout(getattr(self.cfg, "packing", "auto"), spec)
        self.temperature = float(temperature)
        # the last stage computes logits for the response rows only (False: all rows, then a selection)
        self.response_rows_only = True
        dtype = torch.bfloat16 if self.cfg.bf16 else torch.float32
        overrides = dict(model_overrides)
        overrides.setdefault("calculate_per_token_loss", True)
        # sequence parallel shards the sequence over TP between the TP regions (TP = 1: nothing to shard)
        self.sequence_parallel = bool(self.cfg.sequence_parallel and tp > 1)
        overrides.setdefault("sequence_parallel", self.sequence_parallel)
        self.seq_multiple = tp if overrides["sequence_parallel"] else 1
        if self.cfg.optimizer_cpu_offload and not (self.cfg.bf16 and self.cfg.use_distributed_optimizer is not False):
            raise ValueError("actor.optimizer_cpu_offload=true needs actor.bf16=true and "
                             "actor.use_distributed_optimizer=true (as megatron's offload optimizer)")
        if self.cfg.recompute in ("selective", "full"):
            overrides.setdefault("recompute_granularity", self.cfg.recompute)
            if self.cfg.recompute == "full":
                overrides.setdefault("recompute_method", self.cfg.recompute_method)
                overrides.setdefault("recompute_num_layers", int(self.cfg.recompute_num_layers))
        elif self.cfg.recompute != "none":
            raise ValueError(f"actor.recompute={self.cfg.recompute!r} must be none, selective or full")
        arch = arch_from_hf_config(hf_config)
        check_moe_layout(self.cfg, arch, tp, overrides["sequence_parallel"])
        if arch.is_moe:
            ep, etp = self.cfg.expert_model_parallel_size, self.cfg.expert_tensor_parallel_size
            if (ep, tp if etp is None else etp) != (mpu.get_expert_model_parallel_world_size(),
                                                    mpu.get_expert_tensor_parallel_world_size()):
                raise ValueError(f"actor.expert_model_parallel_size={ep}, expert_tensor_parallel_size={etp} differ "
                                 "from init_parallel(ep=..., etp=...); pass the same values")
            for k, v in moe_overrides(self.cfg, arch).items():
                overrides.setdefault(k, v)
        chunks = self._prepare_chunks(build_model(hf_config, params_dtype=dtype, spec=spec, layout=self.layout,
                                                  **overrides))
        # MoE: router losses normalised over the whole step (actor/moe.py); None for a dense model
        self.router_loss = StepRouterLoss([c.config for c in chunks], self.seq_multiple) if arch.is_moe else None
        self.vocab_size = int(chunks[0].vocab_size_unpadded)
        want = self.cfg.use_distributed_optimizer
        self.use_dist_opt = bool(want) if want is not None else (self.on_gpu or bool(self.cfg.optimizer_cpu_offload))
        # param gather stays synchronous: the weight export right after the step reads the updated params
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=bool(self.cfg.overlap_grad_reduce),
            bucket_size=self.cfg.grad_reduce_bucket_size,
            use_distributed_optimizer=self.use_dist_opt,
            check_for_nan_in_grad=False,
            average_in_collective=False,
        )
        if with_optimizer:
            self.model = [
                DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c) for c in chunks
            ]
        else:  # inference-only (e.g. the reference policy): no gradient buffers
            for c in chunks:
                c.requires_grad_(False)
            self.model = list(chunks)
        # MoE routing replay (R3): every router measures its own top-k against the batch's rollout routing and,
        # with actor.router_replay=rollout, dispatches to the rollout's experts (router_replay.py); dense: none
        self.router_replay = getattr(self.cfg, "router_replay", "off")
        if self.router_replay not in ("off", "rollout"):
            raise ValueError(f"actor.router_replay={self.router_replay!r} must be off or rollout")
        if self.router_replay == "rollout" and self.cfg.recompute != "none" and pp > 1:
            raise ValueError("actor.router_replay=rollout with actor.recompute needs pipeline_model_parallel_size=1 "
                             "(the 1F1B schedule recomputes a micro-batch after later ones set their routing)")
        has = torch.tensor([float(bool(router_replay.install(chunks, replay=self.router_replay == "rollout")))],
                           device=next(chunks[0].parameters()).device)
        if dist.is_initialized() and dist.get_world_size() > 1:  # job-wide: a PP stage may hold only dense layers
            dist.all_reduce(has, op=dist.ReduceOp.MAX)
        self.has_routers = bool(has.item())
        # (mismatched, counted) (response token, layer) pairs of the last compute_logprobs (whole batch)
        self.last_router_mismatch: Optional[tuple[float, float]] = None
        config = chunks[0].config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = None
        if with_optimizer and ddp_cfg.overlap_grad_reduce:
            # the schedule holds the reduction back until the last micro-batch (megatron's training does the same)
            syncs = [m.no_sync for m in self.model]
            config.no_sync_func = syncs[0] if len(syncs) == 1 else syncs
        self.step = 0
        self.total_steps = max(1, int(total_steps))
        self.optimizer = None
        self.scheduler = None
        # Mixed-precision / distributed optimizers copy the model weights into fp32 main
        # params when built. Weights loaded into ``modules`` afterwards (HF weights,
        # load_full_state) are picked up by one reload before the first step.
        self._param_sync_pending = True
        if with_optimizer:
            self._build_optimizer(dtype)

    # ------------------------------------------------------------------ setup
    def _build_optimizer(self, dtype: torch.dtype) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        c = self.cfg
        if c.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"actor.lr_decay_style={c.lr_decay_style!r} must be constant, linear or cosine")
        ocfg = OptimizerConfig(
            optimizer="adam",
            lr=c.lr,
            min_lr=c.min_lr,
            weight_decay=c.weight_decay,
            adam_beta1=c.adam_beta1,
            adam_beta2=c.adam_beta2,
            adam_eps=c.adam_eps,
            clip_grad=c.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=self.use_dist_opt,
            **offload_settings(c),
        )
        self.optimizer = get_megatron_optimizer(ocfg, self.model, use_gloo_process_groups=False)
        warm = int(c.lr_warmup_steps)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if warm > 0 else c.lr,
            max_lr=c.lr,
            min_lr=c.min_lr,
            lr_warmup_steps=warm,
            lr_decay_steps=max(self.total_steps, warm + 1),
            lr_decay_style=c.lr_decay_style,
            start_wd=c.weight_decay,
            end_wd=c.weight_decay,
            wd_incr_steps=self.total_steps,
            wd_incr_style="constant",
        )

    def _prepare_chunks(self, chunks: list) -> list:
        """Hook run on the bare GPTModel chunks before DDP wrapping and the optimizer (the critic swaps its head here)."""
        return chunks

    @property
    def modules(self) -> list:
        """Unwrapped GPTModel chunks of this rank."""
        return [getattr(m, "module", m) for m in self.model]

    def _my_microbatches(self, batch: ActorBatch) -> tuple[list[int], list[PackedMicroBatch]]:
        """(this DP rank's sample ids, its packed micro-batches)."""
        from megatron.core import parallel_state as mpu

        for i, x in enumerate(batch.input_ids):
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
                raise ValueError(
                    f"ActorBatch.input_ids[{i}] holds token id {int(x.max()) if int(x.max()) >= self.vocab_size else int(x.min())} "
                    f"outside the model's vocabulary [0, {self.vocab_size}); check the tokenizer / model pair"
                )
        lengths = batch.lengths
        dp = mpu.get_data_parallel_world_size()
        mine = split_for_dp(lengths, dp)[mpu.get_data_parallel_rank()]
        groups = make_microbatches(
            [lengths[i] for i in mine],
            max_tokens=self.cfg.max_tokens_per_gpu,
            micro_batch_size=self.cfg.micro_batch_size,
            layout=self.layout,
        )
        if self.router_loss is not None and mpu.get_expert_model_parallel_world_size() > 1:
            groups = equal_microbatch_count(groups, [lengths[i] for i in mine])
        dev = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        mbs = [
            pack_microbatch(batch.input_ids, batch.prompt_lens, [mine[j] for j in g], layout=self.layout, device=dev,
                            pad_to_multiple=self.seq_multiple,
                            routed_experts=batch.routed_experts if self.has_routers else None)
            for g in groups
        ]
        return mine, mbs

    def _router_mismatch(self) -> tuple[float, float]:
        """(mismatched, counted) (response token, layer) pairs since the last call, summed over the job (collective).

        Each PP stage counts its own layers and each DP rank its samples; TP ranks see the same tokens unless
        sequence parallelism splits them, so without SP only TP rank 0 counts."""
        from megatron.core import parallel_state as mpu

        mism, cnt = router_replay.take_mismatch(self.modules)
        if not self.sequence_parallel and mpu.get_tensor_model_parallel_rank() != 0:
            mism = cnt = 0
        dev = next(self.model[0].parameters()).device
        t = torch.tensor([float(mism), float(cnt)], dtype=torch.float64, device=dev)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return float(t[0]), float(t[1])

    def _run_eval(self, mbs: list, fn) -> list[dict]:
        """Forward-only schedule with the model chunks in eval mode (restored afterwards)."""
        for m in self.model:
            m.eval()
        try:
            return run_schedule(self.model, mbs, fn, forward_only=True)
        finally:
            for m in self.model:
                m.train()

    # --------------------------------------------------------------- logprobs
    @torch.no_grad()
    def compute_logprobs(
        self, batch: ActorBatch, *, compute_entropy: bool = False
    ) -> tuple[list[torch.Tensor], Optional[list[torch.Tensor]]]:
        """Forward-only pipeline pass; per-sample response-token log-probs (and entropies).

        Returns (logp, entropy): B CPU float32 tensors [R_i] each (entropy None
        unless ``compute_entropy``), identical on every rank.
        """
        batch.validate()
        R = batch.response_lens
        offsets = [0]
        for r in R:
            offsets.append(offsets[-1] + r)
        total = offsets[-1]
        _, mbs = self._my_microbatches(batch)
        dev = mbs[0].labels.device if mbs else torch.device("cpu")
        buf = torch.zeros(2 if compute_entropy else 1, total, dtype=torch.float32, device=dev)

        def token_fn(mb: PackedMicroBatch, logp: torch.Tensor, ent: torch.Tensor):
            return logp.sum() * 0.0, {"logp": logp.detach(), "entropy": ent.detach()}

        fn = logprob_output_fn(
            token_fn, temperature=self.temperature, vocab_size=self.vocab_size, compute_entropy=compute_entropy,
            response_rows_only=self.response_rows_only,
        )
        stats = self._run_eval(mbs, fn)
        self.last_router_mismatch = self._router_mismatch() if self.has_routers and batch.routed_experts else None
        for mb, st in zip(mbs, stats):
            pieces = torch.split(st["logp"].float(), mb.resp_lens)
            epieces = torch.split(st["entropy"].float(), mb.resp_lens) if compute_entropy else None
            for k, i in enumerate(mb.sample_ids):
                buf[0, offsets[i]: offsets[i + 1]] = pieces[k]
                if compute_entropy:
                    buf[1, offsets[i]: offsets[i + 1]] = epieces[k]
        # non-last stages and other DP ranks hold zeros: sums are exact copies
        pp_broadcast_from_last(buf)
        dp_sum(buf)
        buf = buf.cpu()
        logp = [buf[0, offsets[i]: offsets[i + 1]].clone() for i in range(len(R))]
        ent = [buf[1, offsets[i]: offsets[i + 1]].clone() for i in range(len(R))] if compute_entropy else None
        return logp, ent

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits [B, T, V] (fp32, CPU, unpadded vocab) of equal-length sequences [B, T].

        One micro-batch, no packing; TP shards are gathered and the result is
        broadcast from the last pipeline stage, so every rank returns it. For
        checks and debugging (memory: one [B, T, V] tensor).
        """
        from megatron.core import parallel_state as mpu

        ids = torch.as_tensor(input_ids, dtype=torch.long)
        B, T = ids.shape
        dev = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        mb = pack_microbatch([ids[b] for b in range(B)], [T] * B, list(range(B)), layout=self.layout, device=dev,
                             pad_to_multiple=self.seq_multiple)
        tp = mpu.get_tensor_model_parallel_world_size()

        def output_fn(mb_, out):
            local = out.detach().float().contiguous()
            if tp > 1:
                parts = [torch.empty_like(local) for _ in range(tp)]
                torch.distributed.all_gather(parts, local, group=mpu.get_tensor_model_parallel_group())
                local = torch.cat(parts, dim=-1)
            return out.sum() * 0.0, {"logits": local}

        stats = self._run_eval([mb], output_fn)
        Vp = self.modules[0].vocab_size
        buf = torch.zeros(B, T, Vp, dtype=torch.float32, device=dev)
        if stats:
            buf.copy_(stats[0]["logits"][:, :T].reshape(B, T, Vp))
        pp_broadcast_from_last(buf)
        return buf[..., : self.vocab_size].cpu()

    # ------------------------------------------------------------- train step
    def train_step(self, batch: ActorBatch, loss_cfg: Any, rfpo_cfg: Any = None, *,
                   old_logp_from_forward: bool = False) -> dict[str, float]:
        """One optimizer step on the whole batch; returns ``train/*`` metrics (floats, same on every rank).

        loss_cfg: ``AlgoConfig``-like (policy_loss, loss_agg_mode, loss_agg_max_len / max_response_len,
        clip_ratio_low/high/c, entropy_coeff, use_kl_loss, kl_loss_coef, kl_loss_type, pos_nll_coef, chord_mu,
        loss-specific keys ...); null clip ratios / aggregation take the policy loss's own defaults.
        rfpo_cfg: ``RFPOConfig``-like (loss_form) or None.
        Requires batch.advantages and batch.old_logp (batch.ref_logp with use_kl_loss, batch.is_positive with
        pos_nll_coef > 0). The micro-batch loss is the library objective
        ``algos.objective.compute_actor_loss`` with whole-step counts; with ``actor.use_fused_kernels`` and a
        ppo-type loss the per-token policy loss (ratio, clip, dual clip, R_off, TIS) comes from the fused loss
        kernel (``kernels.loss``: Triton on CUDA, its torch twin elsewhere).

        old_logp_from_forward: batch.old_logp must be None; the old log-probs are this forward's own detached
        log-probs (ratio 1 by construction). Exact only when this is the one optimizer step on weights that
        produced nothing else the loss reads (the trainer decides: train.batch.old_logp_from_forward).
        """
        import copy

        from rfpo_megatron.algos.objective import StepCounts, compute_actor_loss
        from rfpo_megatron.config import resolve_loss_defaults

        if self.optimizer is None:
            raise RuntimeError("Actor was built with with_optimizer=False; train_step needs the optimizer")
        batch.validate()
        if old_logp_from_forward and batch.old_logp is not None:
            raise ValueError("train_step(old_logp_from_forward=True) takes a batch without old_logp")
        if batch.advantages is None or (batch.old_logp is None and not old_logp_from_forward):
            raise ValueError("train_step needs batch.advantages and batch.old_logp (run compute_logprobs first)")
        a = resolve_loss_defaults(copy.copy(loss_cfg))
        use_kl = bool(_cfg(a, "use_kl_loss", False))
        if use_kl and batch.ref_logp is None:
            raise ValueError("algorithm.use_kl_loss=true needs batch.ref_logp")
        policy = _cfg(a, "policy_loss", "ppo")
        mode = _cfg(a, "loss_agg_mode", None) or "token-mean"
        max_len = None
        if mode == "seq-mean-token-sum-norm":
            # Dr.GRPO: a constant L_max (never the batch's longest response)
            max_len = _cfg(a, "loss_agg_max_len", None) or _cfg(a, "max_response_len", None)
            if not max_len:
                raise ValueError("loss_agg_mode=seq-mean-token-sum-norm needs algo.loss_agg_max_len or "
                                 "algo.max_response_len (the constant L_max)")
        pos_coef = float(_cfg(a, "pos_nll_coef", 0.0) or 0.0)
        chord_mu = float(_cfg(a, "chord_mu", 0.0) or 0.0)
        if pos_coef and batch.is_positive is None:
            raise ValueError("algo.pos_nll_coef > 0 needs batch.is_positive (the correct responses)")
        masks = [batch.mask_of(i) for i in range(len(batch))]
        n_tok = int(sum(int(m.sum()) for m in masks))
        n_seq = int(sum(1 for m in masks if bool(m.any())))
        if n_tok == 0:
            raise ValueError("train_step: the batch has no response tokens in the loss mask")
        pos = batch.is_positive if batch.is_positive is not None else torch.zeros(len(batch), dtype=torch.bool)
        fixed = batch.is_fixed if batch.is_fixed is not None else torch.zeros(len(batch), dtype=torch.bool)
        counts = StepCounts(float(n_tok), float(n_seq),
                            float(sum(int(m.sum()) for m, p in zip(masks, pos.tolist()) if p)),
                            float(sum(int(m.sum()) for m, f in zip(masks, fixed.tolist()) if f)))
        loss_form = _cfg(rfpo_cfg, "loss_form", "faithful") if rfpo_cfg is not None else "faithful"
        pl_fn = get_policy_loss(policy)
        pl_kwargs = self._policy_loss_kwargs(pl_fn, a, rfpo_cfg)
        pl_kwargs.pop("loss_form", None)
        if policy == "bapo":
            pl_kwargs["bapo_clip_bounds"] = self._bapo_bounds(batch, masks, pl_kwargs, loss_form, old_logp_from_forward)
        fused = bool(getattr(self.cfg, "use_fused_kernels", False)) and policy in FUSED_LOSSES
        obj_kw = dict(
            loss_agg_mode=mode, counts=counts, loss_agg_max_len=max_len, loss_form=loss_form,
            entropy_coeff=float(_cfg(a, "entropy_coeff", 0.0) or 0.0), use_kl_loss=use_kl,
            kl_loss_coef=float(_cfg(a, "kl_loss_coef", 0.0) or 0.0), kl_loss_type=_cfg(a, "kl_loss_type", "k3"),
            pos_nll_coef=pos_coef, chord_mu=chord_mu,
            offpolicy_shaping=_cfg(rfpo_cfg, "offpolicy_shaping", "none") if rfpo_cfg is not None else "none",
            shaping_c=float(_cfg(rfpo_cfg, "shaping_c", 0.1) if rfpo_cfg is not None else 0.1),
        )
        guide = obj_kw["offpolicy_shaping"] == "guide"
        if guide and bool(fixed.any()):
            rl = batch.rollout_logp
            bad = [i for i in range(len(batch)) if bool(fixed[i])
                   and (rl is None or bool(torch.isnan(rl[i]).any()))]
            if bad:
                raise ValueError(f"rfpo.offpolicy_shaping=guide: fixed rows {bad[:8]} have no rollout log-probs "
                                 "(the engine's log-probs of the fix under the fix prompt); use an engine that "
                                 "returns them, or offpolicy_shaping=luffy")
        extra_keys = (("train/pos_nll",) if pos_coef else ()) + (("train/chord_sft",) if chord_mu else ())

        def per_sample(values, ids, dev, fill=0.0):
            return pad_tokens([values[i] for i in ids], fill=fill).to(dev)

        def token_fn(mb: PackedMicroBatch, logp: torch.Tensor, ent: torch.Tensor):
            dev = logp.device
            ids = mb.sample_ids
            lp = pad_tokens(list(torch.split(logp, mb.resp_lens)))
            en = pad_tokens(list(torch.split(ent, mb.resp_lens)))
            mask = pad_tokens([masks[i] for i in ids], fill=False, dtype=torch.bool).to(dev)
            old = lp.detach() if old_logp_from_forward else per_sample(batch.old_logp, ids, dev)
            adv = per_sample(batch.advantages, ids, dev)
            log_roff = batch.log_roff[ids].to(dev) if batch.log_roff is not None else None
            tis = per_sample(batch.tis_weights, ids, dev, fill=1.0) if batch.tis_weights is not None else None
            pg_tokens = None
            if fused:
                pg_tokens = self._fused_token_loss(mb, logp, batch, masks, ids, loss_form, a, lp.shape[1],
                                                   old_logp_from_forward)
            total, met = compute_actor_loss(
                policy, lp, old, adv, mask, log_roff=log_roff, is_fixed=fixed[ids].to(dev),
                is_positive=pos[ids].to(dev), tis_weights=tis, pg_tokens=pg_tokens, entropy=en,
                ref_logp=per_sample(batch.ref_logp, ids, dev) if use_kl else None,
                fix_logp=(pad_tokens([batch.rollout_logp[i] if bool(fixed[i]) else torch.zeros(int(masks[i].numel()))
                                      for i in ids]).to(dev) if guide and bool(fixed.any()) else None),
                **obj_kw, **pl_kwargs,
            )
            # token-mean style metrics, summed over micro-batches / DP ranks
            frac = mask.sum().float() / n_tok
            mf = mask.float()
            zero = torch.zeros((), device=dev)
            stats = {
                "train/loss": total.detach(),
                "train/pg_loss": met["pg_loss"],
                "train/kl_loss": met.get("kl_loss", zero),
                "train/entropy": (en.detach() * mf).sum() / n_tok,
                "train/ppo_kl": ((old - lp.detach()) * mf).sum() / n_tok,
            }
            if pos_coef:
                stats["train/pos_nll"] = met["pos_nll"]
            if chord_mu:
                stats["train/chord_sft"] = met["chord_sft"]
            clip = met.get("clipfrac")
            stats["train/pg_clipfrac"] = (clip.detach().float() * frac) if clip is not None else zero
            return total, stats

        fn = logprob_output_fn(token_fn, temperature=self.temperature, vocab_size=self.vocab_size,
                               response_rows_only=self.response_rows_only)
        keys = ("train/loss", "train/pg_loss", "train/kl_loss", "train/entropy", "train/ppo_kl",
                "train/pg_clipfrac") + extra_keys
        out, grad_norm, ok = self._optimizer_step(batch, fn, keys)
        if self.has_routers and batch.routed_experts is not None:
            # share of (response token, layer) pairs whose own top-k set differs from the rollout's (R3)
            mism, cnt = self._router_mismatch()
            out["train/router_replay_mismatch"] = mism / cnt if cnt else 0.0
        out["train/grad_norm"] = grad_norm
        out["train/lr"] = self._last_lr
        out["train/update_skipped"] = 0.0 if ok else 1.0
        return out

    @staticmethod
    def _fused_token_loss(mb: PackedMicroBatch, logp: torch.Tensor, batch: ActorBatch, masks: list, ids: list,
                          loss_form: str, a: Any, width: int, old_from_forward: bool = False) -> tuple[torch.Tensor, dict]:
        """Per-token ppo loss of one packed micro-batch from the fused loss kernel (ratio, clip, dual clip, R_off
        in the chosen form, TIS weights): ([b, width] padded, {clipfrac, ppo_kl}). old_from_forward: old_logp
        is logp.detach() (train_step's old_logp_from_forward)."""
        from rfpo_megatron.kernels.loss import fused_rfpo_token_loss

        dev = logp.device
        mask = torch.cat([masks[i] for i in ids]).to(dev)
        old = logp.detach() if old_from_forward else torch.cat([batch.old_logp[i] for i in ids]).to(dev)
        adv = torch.cat([batch.advantages[i] for i in ids]).to(dev)
        zero = torch.zeros((), dtype=old.dtype, device=dev)
        old, adv = torch.where(mask, old, zero), torch.where(mask, adv, zero)
        lens = torch.tensor([0] + list(mb.resp_lens), dtype=torch.int64)
        cu = torch.cumsum(lens, 0).to(dev)
        log_roff = batch.log_roff[ids].to(dev) if batch.log_roff is not None else torch.zeros(len(ids), device=dev)
        from rfpo_megatron.algos.policy_loss import max_log_roff

        bound = max_log_roff(torch.float32)  # as the registry losses: R_off², ρ, A stay finite in fp32
        log_roff = log_roff.clamp(-bound, bound)
        w = torch.cat([batch.tis_weights[i] for i in ids]).to(dev) if batch.tis_weights is not None else None
        loss, st = fused_rfpo_token_loss(
            logp, old, adv, cu, log_roff.float(), float(_cfg(a, "clip_ratio_low", 0.2)),
            float(_cfg(a, "clip_ratio_high", 0.2)), _cfg(a, "clip_ratio_c", None), form=loss_form, weights=w,
        )
        n = mask.sum().clamp(min=1)
        met = {"clipfrac": (st["clipped"] & mask).sum().float() / n,
               "ppo_kl": torch.where(mask, old - logp.detach(), zero).sum() / n}
        return pad_tokens(list(torch.split(loss.to(logp.dtype), mb.resp_lens))), met

    def _optimizer_step(self, batch: ActorBatch, output_fn, keys: tuple) -> tuple[dict[str, float], float, bool]:
        """Forward-backward of this rank's micro-batches with ``output_fn``, then one optimizer step.

        Returns ({key: sum over micro-batches and DP ranks of the 0-dim stats}, grad norm, step applied).
        The learning rate the step used is left in ``self._last_lr``.
        """
        if self._param_sync_pending:
            self.optimizer.reload_model_params()
            self._param_sync_pending = False
        self.optimizer.zero_grad()
        for m in self.model:
            m.zero_grad_buffer()
        _, mbs = self._my_microbatches(batch)
        if self.router_loss is not None:
            self.router_loss.set_step_tokens(mbs, real=bool(mbs))
        if not mbs:
            # this DP rank got no samples: one zero-loss micro-batch keeps its gradient hooks, bucketed
            # reductions and pipeline sends in step with the other ranks (its gradients are exactly 0)
            dev0 = next(self.model[0].parameters()).device
            mbs = [pack_microbatch([torch.zeros(2, dtype=torch.long)], [1], [0], layout=self.layout, device=dev0,
                                   pad_to_multiple=self.seq_multiple)]

            def output_fn(mb, out):  # noqa: F811 - the empty rank's loss
                return out.sum() * 0.0, {k: torch.zeros((), device=out.device) for k in keys}
        stats = run_schedule(self.model, mbs, output_fn, forward_only=False)
        dev = next(self.model[0].parameters()).device
        acc = torch.zeros(len(keys), dtype=torch.float64, device=dev)
        for st in stats:
            acc += torch.stack([st[k].double().reshape(()) for k in keys]).to(dev)
        pp_broadcast_from_last(acc)
        dp_sum(acc)
        ok, grad_norm, _ = self.optimizer.step()
        self._last_lr = float(self.optimizer.param_groups[0]["lr"])
        if ok:
            self.scheduler.step(increment=1)
        self.step += 1
        out = {k: float(v) for k, v in zip(keys, acc.tolist())}
        if self.router_loss is not None:
            out.update(self.router_loss.metrics())
        return out, float(grad_norm) if grad_norm is not None else float("nan"), bool(ok)

    def _bapo_bounds(self, batch: ActorBatch, masks: list, pl_kwargs: dict, loss_form: str = "faithful",
                     old_from_forward: bool = False) -> tuple[float, float]:
        """BAPO's adaptive (c_low, c_high) from the WHOLE step batch (one extra forward-only pass),
        so the bounds do not depend on the micro-batch split (old_from_forward: old = now, ratio 1)."""
        from rfpo_megatron.algos.policy_loss import bapo_bounds

        now, _ = self.compute_logprobs(batch)
        olds = now if old_from_forward else batch.old_logp
        log_ratio = pad_tokens([n - o for n, o in zip(now, olds)])
        ratio = torch.exp(log_ratio.double().clamp(-20.0, 20.0))
        if batch.log_roff is not None and loss_form != "weighted":  # weighted: R_off is not in the ratio
            ratio = ratio * torch.exp(batch.log_roff.double()).unsqueeze(-1)
        adv = pad_tokens(batch.advantages).double()
        mask = pad_tokens(masks, fill=False, dtype=torch.bool)
        kw = {k: v for k, v in pl_kwargs.items() if k.startswith("bapo_") and k != "bapo_clip_bounds"}
        c_low, c_high, _ = bapo_bounds(ratio, adv, mask, **kw)
        return float(c_low), float(c_high)

    @staticmethod
    def _policy_loss_kwargs(fn, loss_cfg: Any, rfpo_cfg: Any) -> dict:
        """Keyword arguments of the registry policy loss, filled from the configs by name."""
        params = inspect.signature(fn).parameters
        kw: dict[str, Any] = {}
        sources = [loss_cfg, rfpo_cfg]
        for name, p in params.items():
            if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or name in (
                "logp", "old_logp", "advantages", "response_mask", "log_roff",
            ):
                continue
            for src in sources:
                if src is not None and hasattr(src, name):
                    kw[name] = getattr(src, name)
                    break
        if rfpo_cfg is not None and "loss_form" in params and hasattr(rfpo_cfg, "loss_form"):
            kw["loss_form"] = rfpo_cfg.loss_form
        return kw

    def lr(self) -> float:
        """Current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else 0.0
