"""A TP = 1 megatron actor whose optimizer step records the reduced gradients instead of moving the weights:
one actor serves every case of the knob-by-knob gradient tests (test_algos_train_step_*.py)."""
from __future__ import annotations

import os

import torch

HF = dict(model_type="qwen2", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
          intermediate_size=48, vocab_size=61, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
          max_position_embeddings=64)


def grad_recording_actor(micro_batch_size: int):
    """Yields the actor (a._grads: one list of float64 main_grads per optimizer step); tears parallel state down."""
    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel
    from rfpo_megatron.config import ActorConfig
    from rfpo_megatron.rollout.procs import free_port

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    init_parallel(1, 1, seed=3)
    a = Actor(HF, ActorConfig(micro_batch_size=micro_batch_size, max_tokens_per_gpu=None, lr=1e-3, clip_grad=0.0))
    grads: list = []

    def step():  # record the reduced gradients, do not move the weights
        grads.append([p.main_grad.detach().double().clone() for m in a.model for p in m.parameters()])
        return True, 0.0, None

    a.optimizer.step = step
    a._grads = grads
    yield a
    destroy_parallel()
