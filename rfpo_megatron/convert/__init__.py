"""HF <-> megatron-core checkpoint conversion: one name/shape mapping per model family, shared by tools and weight sync.

Public entry points (imported lazily so that `import rfpo_megatron.convert` stays light):

- `arch_from_hf_config(cfg) -> Arch`                       (arch.py)
- `gather_full_state`, `load_full_state`, `iter_full_params` (sharding.py, live models)
- `iter_hf_weights(model_chunks, hf_config, bucket_bytes)`   (export.py, rollout weight sync)
- `save_weights`, `load_weights`                             (mcore_io.py, the rfpo-mcore format)
- `hf_to_mcore`, `mcore_to_hf`, `load_hf_into_model`         (offline.py)
"""
from rfpo_megatron.convert.arch import Arch, ConversionError, arch_from_hf_config

__all__ = ["Arch", "ConversionError", "arch_from_hf_config"]
