"""PPO with a critic (algo.adv_estimator=gae): build the value model, the value pass and the critic update.

Per step (every rank): `value_pass` scores the N batch rows on their PLAIN prompt (fixed RFPO samples included,
like the log-prob pass) -> values [N, T]; `train.batch.advantages` turns them into GAE advantages and returns
(both end up on the train.batch.Step); `update_critic(rt, step)` fits the values to those returns with the
clipped value loss before the actor update. Without gae no critic is built and both functions do nothing.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from rfpo_megatron.config import Config
from rfpo_megatron.train.batch import Step, StepBatch, minibatch_updates
from rfpo_megatron.train.runtime import Runtime


def build_critic(cfg: Config) -> Any:
    """The value model: actor.hf_model_path's trunk, the actor's parallel layout, critic.* optimizer settings."""
    from transformers import AutoConfig

    from rfpo_megatron.actor.critic import Critic

    hf_config = AutoConfig.from_pretrained(cfg.actor.hf_model_path)
    steps = max(1, cfg.trainer.steps * cfg.critic.ppo_epochs)
    return Critic(hf_config, cfg.actor, cfg.critic, hf_path=cfg.actor.hf_model_path, total_steps=steps)


def value_pass(rt: Runtime, batch: StepBatch) -> Optional[torch.Tensor]:
    """[N, T] critic values of the batch rows (0 on padding), or None when the run has no critic."""
    if rt.critic is None:
        return None
    from rfpo_megatron.actor.batch import ActorBatch, pad_tokens

    vals = rt.critic.compute_values(ActorBatch.from_prompt_response(batch.prompt_ids, batch.response_ids))
    out = pad_tokens(vals, dtype=torch.float32)
    return torch.nn.functional.pad(out, (0, batch.response_mask.shape[1] - out.shape[1]))


def update_critic(rt: Runtime, step: Step) -> dict[str, float]:
    """critic.ppo_epochs passes in mini-batches of actor.global_batch_size rows of the clipped value loss towards
    `step.returns` (old values: `step.values`); returns the critic/* metrics averaged over the steps ({} without
    a critic)."""
    if rt.critic is None:
        return {}
    from rfpo_megatron.actor.batch import ActorBatch

    cfg = rt.cfg

    def update(mb: Step) -> Optional[dict]:
        if not bool(mb.loss_mask.any()):
            return None
        b, lens = mb.batch, [len(r) for r in mb.batch.response_ids]
        ab = ActorBatch.from_prompt_response(b.prompt_ids, b.response_ids,
                                             response_mask=[mb.loss_mask[i, :L] for i, L in enumerate(lens)])
        return rt.critic.train_step(ab, [mb.values[i, :L] for i, L in enumerate(lens)],
                                    [mb.returns[i, :L] for i, L in enumerate(lens)],
                                    cliprange_value=cfg.critic.cliprange_value, loss_cfg=cfg.algo)

    out, steps = minibatch_updates(step, cfg.actor.global_batch_size, cfg.critic.ppo_epochs, update)
    out["critic/optimizer_steps"] = float(steps)
    return out
