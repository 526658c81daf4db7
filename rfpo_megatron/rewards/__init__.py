"""Verifiers (math-verify, exact match, addition task, sandboxed code execution, user functions by path, a remote
service) returning a reward and an error message."""
from rfpo_megatron.rewards.base import RewardResult, Verifier, score_many
from rfpo_megatron.rewards.registry import available_rewards, build_reward, get_reward_fn, register_reward

__all__ = ["RewardResult", "Verifier", "score_many", "get_reward_fn", "register_reward", "available_rewards", "build_reward"]
