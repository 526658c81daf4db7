"""RoPE settings read from HF configs of either transformers generation (rope_scaling / rope_parameters)."""
import pytest

from rfpo_megatron.actor.model import megatron_rope_scaling
from rfpo_megatron.convert.arch import arch_from_hf_config

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
# the non-rope fields every config needs; the rope fields come from each case
BASE = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=96, vocab_size=256)


def _arch(**rope):
    return arch_from_hf_config({**BASE, **rope})


@pytest.mark.parametrize("rope", [
    {"rope_theta": 5e5, "rope_scaling": LLAMA3},             # transformers 4.x config.json
    {"rope_parameters": {**LLAMA3, "rope_theta": 5e5}},      # transformers 5 config.json (rope_parameters only)
])
def test_llama3_scaling_found_in_both_layouts(rope):
    arch = _arch(**rope)
    assert megatron_rope_scaling(arch) == (True, 8.0)
    assert arch.rope_theta == 5e5


def test_llama3_scaling_from_a_transformers_config_object():
    import transformers as tf

    cfg = tf.LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"}, rope_theta=5e5,
                         rope_scaling={**LLAMA3, "factor": 16.0})
    arch = arch_from_hf_config(cfg)
    assert megatron_rope_scaling(arch) == (True, 16.0)
    assert arch.rope_theta == 5e5


def test_default_rope_means_no_scaling_and_unknown_type_is_refused():
    assert megatron_rope_scaling(_arch(rope_parameters={"rope_type": "default", "rope_theta": 1e6})) == (False, 8.0)
    assert _arch(rope_parameters={"rope_type": "default", "rope_theta": 1e6}).rope_theta == 1e6
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        megatron_rope_scaling(_arch(rope_parameters={"rope_type": "yarn", "factor": 4.0}))


def test_llama3_constant_megatron_fixes_is_checked():
    with pytest.raises(ValueError, match=r"rope_scaling.high_freq_factor=2.0 unsupported \(megatron-core fixes it at 4.0\)"):
        megatron_rope_scaling(_arch(rope_scaling={**LLAMA3, "high_freq_factor": 2.0}))
