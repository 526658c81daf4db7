"""Critic: the value model of PPO with GAE = the actor's megatron-core GPTModel with a scalar value head.

Usage (every rank of the job, after ``init_parallel``; every rank passes the same whole batch)::

    critic = Critic(hf_config, actor_cfg, critic_cfg, hf_path=actor_cfg.hf_model_path, total_steps=100)
    values = critic.compute_values(batch)                               # B x [R_i]
    metrics = critic.train_step(batch, values, returns, cliprange_value=0.5)   # critic/* floats

``Critic`` is an ``Actor`` (same micro-batching / packing, pipeline schedule, DDP, megatron optimizer and LR
schedule, checkpoint format) whose model differs on the last pipeline stage only: the LM head is removed and the
final-norm hidden states [s, b, h] go through ``value_head = Linear(h, 1)``. The head is replicated over TP:
without sequence parallelism (refused by the actor) the hidden states are complete on every TP rank, so every TP
rank computes the same values and the same head gradient. The trunk starts from the HF weights, the head at 0.

Alignment: the value of response token t is read at the row that predicts it (the state before emitting t), i.e.
exactly the rows of the actor's log-probs (``PackedMicroBatch.label_rows``).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Optional, Sequence

import torch

from rfpo_megatron.actor.actor import Actor, _cfg
from rfpo_megatron.actor.batch import ActorBatch, pad_tokens
from rfpo_megatron.actor.forward import dp_sum, pp_broadcast_from_last
from rfpo_megatron.actor.packing import PackedMicroBatch
from rfpo_megatron.algos.aggregation import aggregate
from rfpo_megatron.config import ActorConfig, CriticConfig

METRIC_KEYS = ("critic/value_loss", "critic/vf_clipfrac", "critic/values_mean", "critic/returns_mean",
               "critic/grad_norm", "critic/lr")


def clipped_value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor,
                       cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO value loss 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).

    values, values_old, returns: [B, T]. Returns (loss [B, T], clipped [B, T] bool: the clipped term was larger).
    """
    v_clip = values_old + (values - values_old).clamp(-cliprange_value, cliprange_value)
    l_plain = (values - returns) ** 2
    l_clip = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(l_plain, l_clip), l_clip > l_plain


class _ValueOutput:
    """Stands in for ``GPTModel.output_layer`` on the last stage: hidden [s, b, h] -> (values [s, b, 1], None).

    Under sequence parallel the hidden states arrive sequence-sharded ([s/tp, b, h]) and are gathered first.

    A plain object (not a Module) so the head's parameters are registered once, as ``value_head.*``.
    """

    def __init__(self, head: torch.nn.Module, sequence_parallel: bool = False) -> None:
        self.head = head
        self.sequence_parallel = sequence_parallel

    def __call__(self, hidden: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None):
        if self.sequence_parallel:
            # [s/tp, b, h] -> [s, b, h]; every TP rank then computes the same values and loss, so the backward
            # keeps this rank's slice of the (identical) gradient instead of summing it over TP
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return self.head(hidden), None


def _critic_sharded_state_dict(model, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
    """``GPTModel.sharded_state_dict`` of a last-stage critic chunk, which has no LM head.

    megatron's LanguageModule version marks ``output_layer.weight`` (KeyError without it); this is the generic
    MegatronModule recursion it builds on: embedding and decoder sharded as megatron shards them, and
    ``value_head.weight`` / ``value_head.bias`` replicated over TP (a plain Linear, like the head itself), so dist
    checkpoints (model and optimizer state) save and reshard the critic across TP / PP layouts.
    """
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule.sharded_state_dict(model, prefix, sharded_offsets, metadata)


def critic_actor_config(actor_cfg: ActorConfig, critic_cfg: CriticConfig) -> ActorConfig:
    """The actor's layout / batching config with the critic's optimizer settings (lr, warm-up, decay, clip)."""
    return dataclasses.replace(actor_cfg, lr=critic_cfg.lr, min_lr=critic_cfg.min_lr,
                               lr_warmup_steps=critic_cfg.warmup_steps, weight_decay=critic_cfg.weight_decay,
                               clip_grad=critic_cfg.clip_grad)


class Critic(Actor):
    """This rank's value-model chunks, optimizer and LR scheduler.

    hf_config: HF config (dict or PretrainedConfig) of the actor's model.
    actor_cfg: ``ActorConfig`` (tp/pp, micro-batching, bf16, ... are shared with the actor).
    critic_cfg: ``CriticConfig`` (lr, min_lr, warmup_steps, weight_decay, clip_grad).
    hf_path: HF directory whose weights initialise the trunk (None: random init, for tests).
    """

    def __init__(self, hf_config: Any, actor_cfg: Optional[ActorConfig] = None,
                 critic_cfg: Optional[CriticConfig] = None, *, hf_path: Optional[str] = None,
                 total_steps: int = 1, spec: str = "auto", **model_overrides: Any) -> None:
        self.critic_cfg = critic_cfg or CriticConfig()
        self._hf_path = hf_path
        super().__init__(hf_config, critic_actor_config(actor_cfg or ActorConfig(), self.critic_cfg),
                         total_steps=total_steps, spec=spec, with_optimizer=True, **model_overrides)

    def _prepare_chunks(self, chunks: list) -> list:
        """Load the HF trunk, then replace the last stage's LM head by a zero-initialised Linear(h, 1)."""
        from megatron.core.tensor_parallel import set_defaults_if_not_set_tensor_model_parallel_attributes

        if self._hf_path:
            from rfpo_megatron.convert.hf_load import load_hf_into_model

            load_hf_into_model(chunks, self._hf_path)
        for c in chunks:
            # no LM head any more: nothing to tie (also keeps the PP embedding-grad all-reduce off on every stage)
            c.share_embeddings_and_output_weights = False
            if not c.post_process:
                continue
            p0 = next(c.parameters())
            head = torch.nn.Linear(c.config.hidden_size, 1, dtype=c.config.params_dtype, device=p0.device)
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
            for p in head.parameters():
                set_defaults_if_not_set_tensor_model_parallel_attributes(p)
            del c.output_layer
            c.value_head = head
            c.output_layer = _ValueOutput(head, sequence_parallel=bool(c.config.sequence_parallel))
            # dist checkpoints: megatron's LanguageModule.sharded_state_dict expects output_layer.weight
            c.sharded_state_dict = types.MethodType(_critic_sharded_state_dict, c)
        return chunks

    @staticmethod
    def _response_values(output: torch.Tensor, mb: PackedMicroBatch) -> torch.Tensor:
        """[b, T, 1] model output -> [N] values at the rows that predict the response tokens."""
        return output.reshape(-1).index_select(0, mb.label_rows).float()

    @torch.no_grad()
    def compute_values(self, batch: ActorBatch) -> list[torch.Tensor]:
        """Forward-only pass; B CPU float32 tensors [R_i] (V of the state before each response token), same on every rank."""
        batch.validate()
        R = batch.response_lens
        offsets = [0]
        for r in R:
            offsets.append(offsets[-1] + r)
        _, mbs = self._my_microbatches(batch)
        dev = mbs[0].labels.device if mbs else torch.device("cpu")
        buf = torch.zeros(offsets[-1], dtype=torch.float32, device=dev)

        def output_fn(mb: PackedMicroBatch, out: torch.Tensor):
            return out.sum() * 0.0, {"values": self._response_values(out, mb).detach()}

        for mb, st in zip(mbs, self._run_eval(mbs, output_fn)):
            for k, piece in zip(mb.sample_ids, torch.split(st["values"], mb.resp_lens)):
                buf[offsets[k]: offsets[k + 1]] = piece
        pp_broadcast_from_last(buf)  # other stages / DP ranks hold zeros: the sums are exact copies
        dp_sum(buf)
        buf = buf.cpu()
        return [buf[offsets[i]: offsets[i + 1]].clone() for i in range(len(R))]

    def train_step(self, batch: ActorBatch, values_old: Sequence[torch.Tensor], returns: Sequence[torch.Tensor],
                   cliprange_value: float = 0.5, loss_cfg: Any = None) -> dict[str, float]:
        """One optimizer step of the clipped value loss on the whole batch; returns ``critic/*`` metrics (floats).

        values_old, returns: B tensors [R_i] (compute_values before the update; GAE returns). The per-token loss
        ``clipped_value_loss`` is aggregated with ``loss_cfg.loss_agg_mode`` (token-mean default; normalised by
        the whole batch's token / sequence counts, like the policy loss) over ``batch.response_mask``.
        """
        batch.validate()
        B, R = len(batch), batch.response_lens
        values_old = [torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in values_old]
        returns = [torch.as_tensor(r, dtype=torch.float32).reshape(-1) for r in returns]
        for name, xs in (("values_old", values_old), ("returns", returns)):
            if len(xs) != B or any(x.numel() != r for x, r in zip(xs, R)):
                raise ValueError(f"Critic.train_step: {name} must be {B} tensors with the response lengths {R}")
        mode = _cfg(loss_cfg, "loss_agg_mode", None) or "token-mean"
        max_len = _cfg(loss_cfg, "loss_agg_max_len", None) or _cfg(loss_cfg, "max_response_len", None)
        if mode == "seq-mean-token-sum-norm" and not max_len:  # a constant L_max (Dr.GRPO), not the batch's longest
            raise ValueError("loss_agg_mode=seq-mean-token-sum-norm needs algo.loss_agg_max_len or algo.max_response_len")
        masks = [batch.mask_of(i) for i in range(B)]
        n_tok = int(sum(int(m.sum()) for m in masks))
        n_seq = int(sum(1 for m in masks if bool(m.any())))
        if n_tok == 0:
            raise ValueError("Critic.train_step: the batch has no response tokens in the loss mask")
        agg = dict(global_num_tokens=n_tok, global_num_seqs=n_seq, max_len=max_len)
        eps = float(cliprange_value)

        def output_fn(mb: PackedMicroBatch, out: torch.Tensor):
            ids, dev = mb.sample_ids, out.device
            v = pad_tokens(list(torch.split(self._response_values(out, mb), mb.resp_lens)))
            old = pad_tokens([values_old[i] for i in ids]).to(dev)
            ret = pad_tokens([returns[i] for i in ids]).to(dev)
            mask = pad_tokens([masks[i] for i in ids], fill=False, dtype=torch.bool).to(dev)
            tok, clipped = clipped_value_loss(v, old, ret, eps)
            loss = aggregate(tok, mask, mode, **agg)
            mf = mask.float()
            return loss, {"critic/value_loss": loss.detach(),
                          "critic/vf_clipfrac": (clipped.float() * mf).sum() / n_tok,
                          "critic/values_mean": (v.detach() * mf).sum() / n_tok,
                          "critic/returns_mean": (ret * mf).sum() / n_tok}

        out, grad_norm, ok = self._optimizer_step(batch, output_fn, METRIC_KEYS[:4])
        out["critic/grad_norm"] = grad_norm
        out["critic/lr"] = self._last_lr
        out["critic/update_skipped"] = 0.0 if ok else 1.0
        return out
