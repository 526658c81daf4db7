"""RoPE settings read from HF configs of either transformers generation (rope_scaling / rope_parameters)."""
import pytest

from rfpo_megatron.actor.model import _rope_scaling, _rope_theta

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("cfg", [
    {"rope_theta": 5e5, "rope_scaling": LLAMA3},             # transformers 4.x config.json
    {"rope_parameters": {**LLAMA3, "rope_theta": 5e5}},      # transformers 5 config.json (rope_parameters only)
])
def test_llama3_scaling_found_in_both_layouts(cfg):
    assert _rope_scaling(cfg) == (True, 8.0)
    assert _rope_theta(cfg) == 5e5


def test_default_rope_means_no_scaling_and_unknown_type_is_refused():
    assert _rope_scaling({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == (False, 8.0)
    assert _rope_theta({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == 1e6
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        _rope_scaling({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
