"""rfpo_megatron: RFPO training stack (Megatron-core actor, SGLang rollout, fix stage)."""
__version__ = "0.1.0"
