"""Checkpoint (per-expert) HF names -> slices of transformers-5's fused expert parameters.

Checkpoints, SGLang and `convert.export.iter_hf_weights` name MoE experts one by one:
``model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight`` (gate/up [I, H], down [H, I]). transformers 5
(e.g. `Qwen3MoeExperts`, models/qwen3_moe/modeling_qwen3_moe.py) holds each layer's experts fused:
``mlp.experts.gate_up_proj`` [E, 2I, H] (rows [0, I) gate, [I, 2I) up: its forward chunks the product in two,
gate first) and ``mlp.experts.down_proj`` [E, H, I]. transformers converts on load with its own
`conversion_mapping` ("qwen2_moe" rule, used by qwen3_moe: MergeModulelist(dim=0) then Concatenate(dim=1)
over [gate_proj, up_proj]); the embedded engine applies the same layout one expert at a time, so a weight
bucket may carry any subset of a layer's experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_FUSED_GATE_UP = ".experts.gate_up_proj"
_FUSED_DOWN = ".experts.down_proj"


@dataclass(frozen=True)
class ExpertSlot:
    """Where one per-expert tensor lives: state[key][expert, rows] (rows = slice over dim 1 of the fused tensor)."""

    key: str
    expert: int
    rows: slice


def fused_expert_slots(state: dict[str, torch.Tensor]) -> dict[str, ExpertSlot]:
    """Per-expert checkpoint name -> its slot in a fused parameter of `state` (a model's state_dict).

    Empty for models without fused experts (dense models, or experts kept as per-expert modules).
    gate_up_proj must be 3-D [E, 2I, H] and down_proj [E, H, I].
    """
    slots: dict[str, ExpertSlot] = {}
    for key, t in state.items():
        if key.endswith(_FUSED_GATE_UP) and t.dim() == 3:
            prefix = key[: -len("gate_up_proj")]  # "...mlp.experts."
            n_exp, two_i = int(t.shape[0]), int(t.shape[1])
            if two_i % 2:
                raise ValueError(f"{key} has {two_i} rows per expert; expected 2 * moe_intermediate_size (gate, up)")
            i = two_i // 2
            for e in range(n_exp):
                slots[f"{prefix}{e}.gate_proj.weight"] = ExpertSlot(key, e, slice(0, i))
                slots[f"{prefix}{e}.up_proj.weight"] = ExpertSlot(key, e, slice(i, two_i))
        elif key.endswith(_FUSED_DOWN) and t.dim() == 3:
            prefix = key[: -len("down_proj")]
            for e in range(int(t.shape[0])):
                slots[f"{prefix}{e}.down_proj.weight"] = ExpertSlot(key, e, slice(0, int(t.shape[1])))
    return {n: s for n, s in slots.items() if n not in state}


def slot_view(state: dict[str, torch.Tensor], slot: ExpertSlot) -> torch.Tensor:
    """The [rows, cols] view of state[slot.key] that one per-expert tensor occupies (writes go into the fused tensor)."""
    return state[slot.key].data[slot.expert, slot.rows]
