"""PPO with a critic (algo.adv_estimator=gae): build the value model, the value pass and the critic update.

Per step (every rank): `value_pass` scores the N batch rows on their PLAIN prompt (fixed RFPO samples included,
like the log-prob pass) -> values [N, T]; `train.batch.advantages` turns them into GAE advantages and returns
(kept on the StepBatch); `update_critic` fits the values to those returns with the clipped value loss before
the actor update. Without gae no critic is built and both functions do nothing.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from rfpo_megatron.config import Config
from rfpo_megatron.train.runtime import Runtime


def build_critic(cfg: Config) -> Any:
    """The value model: actor.hf_model_path's trunk, the actor's parallel layout, critic.* optimizer settings."""
    from transformers import AutoConfig

    from rfpo_megatron.actor.critic import Critic

    hf_config = AutoConfig.from_pretrained(cfg.actor.hf_model_path)
    steps = max(1, cfg.trainer.steps * cfg.critic.ppo_epochs)
    return Critic(hf_config, cfg.actor, cfg.critic, hf_path=cfg.actor.hf_model_path, total_steps=steps)


def value_pass(rt: Runtime, batch: Any) -> Optional[torch.Tensor]:
    """[N, T] critic values of the batch rows (0 on padding), or None when the run has no critic."""
    if rt.critic is None:
        return None
    from rfpo_megatron.actor.batch import ActorBatch

    vals = rt.critic.compute_values(ActorBatch.from_prompt_response(batch.prompt_ids, batch.response_ids))
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
    for i, v in enumerate(vals):
        out[i, :v.numel()] = v
    return out


def update_critic(rt: Runtime, batch: Any) -> dict[str, float]:
    """critic.ppo_epochs passes in mini-batches of actor.global_batch_size rows of the clipped value loss towards
    `batch.returns` (old values: `batch.values`); returns the critic/* metrics averaged over the steps ({} without
    a critic)."""
    if rt.critic is None:
        return {}
    from rfpo_megatron.actor.batch import ActorBatch
    from rfpo_megatron.train.batch import minibatch_updates

    cfg = rt.cfg
    if batch.values is None or batch.returns is None:
        raise ValueError("update_critic: the StepBatch has no values / returns (run train.batch.advantages first)")
    lens = [len(r) for r in batch.response_ids]

    def step(idx: list) -> Optional[dict]:
        mask = [batch.response_mask[i, :lens[i]] for i in idx]
        if not any(bool(m.any()) for m in mask):
            return None
        ab = ActorBatch.from_prompt_response([batch.prompt_ids[i] for i in idx],
                                             [batch.response_ids[i] for i in idx], response_mask=mask)
        return rt.critic.train_step(ab, [batch.values[i, :lens[i]] for i in idx],
                                    [batch.returns[i, :lens[i]] for i in idx],
                                    cliprange_value=cfg.critic.cliprange_value, loss_cfg=cfg.algo)

    out, steps = minibatch_updates(batch.n, cfg.actor.global_batch_size, cfg.critic.ppo_epochs, step)
    out["critic/optimizer_steps"] = float(steps)
    return out
