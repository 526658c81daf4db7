"""Verifiers (math-verify, exact match, synthetic addition task) returning a reward and an error message."""
from rfpo_megatron.rewards.base import RewardResult, Verifier, score_many
from rfpo_megatron.rewards.registry import available_rewards, get_reward_fn, register_reward

__all__ = ["RewardResult", "Verifier", "score_many", "get_reward_fn", "register_reward", "available_rewards"]
