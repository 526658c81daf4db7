"""HF <-> megatron-core checkpoint conversion: one name/shape mapping per model family, shared by tools and weight sync.

Modules (imported lazily so that `import rfpo_megatron.convert` stays light):

- arch.py         `arch_from_hf_config(cfg) -> Arch`: the validated architecture of an HF config
- mapping.py      HF <-> canonical megatron names/shapes (QKV group interleave, SwiGLU fc1, tying)
- sharding.py     TP split/merge rules; `gather_full_state`, `load_full_state`, `iter_full_params` (live models)
- export.py       `iter_hf_weights(model_chunks, hf_config, bucket_bytes)` (rollout weight sync), `save_hf`
- hf_load.py      `load_hf_into_model(model_chunks, hf_dir)`: each rank reads only its TP slices
- hf_io.py        HF safetensors directories (lazy reader, sharded writer + index, tokenizer files)
- mcore_io.py     the sharded rfpo-mcore format (`save_weights`, `load_weights`)
- validate.py     HF config vs the megatron architecture built (fields named), RoPE check

This package imports nothing of the actor (the actor imports it). The offline tools that need both — `hf_to_mcore`,
`mcore_to_hf`, the actor's checkpoint formats read offline, the `rfpo-megatron convert` CLI — are
rfpo_megatron.offline.
"""
from rfpo_megatron.convert.arch import Arch, ConversionError, arch_from_hf_config

__all__ = ["Arch", "ConversionError", "arch_from_hf_config"]
