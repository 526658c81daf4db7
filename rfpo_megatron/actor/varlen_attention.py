"""Varlen (packed THD) core attention for the local layer spec: the CPU stand-in for TransformerEngine's attention.

``VarlenDotProductAttention`` is megatron's ``DotProductAttention`` (same constructor and forward signature, same
parameters and sharded state) that also accepts ``packed_seq_params`` with ``qkv_format="thd"``: the packed
query / key / value ``[t, heads, d]`` are split at ``cu_seqlens`` and each sequence gets its own causal
``scaled_dot_product_attention``, so no token attends across a sequence boundary. Without packed_seq_params it
is exactly megatron's ``DotProductAttention.forward``.

Used only when TransformerEngine is absent (``model.layer_spec`` with the local spec and the THD layout), so the
path the GPU takes with TE (PackedSeqParams, cu_seqlens, megatron's THD RoPE) runs on CPU too.

Numerics: GQA key/value groups are repeated like megatron does; the softmax scale is megatron's
(``1/sqrt(kv_channels)`` or the config's ``softmax_scale``; ``apply_query_key_layer_scaling`` divides the
score by the layer number and the softmax multiplies it back, so the effective scale is unchanged).
Sliding-window attention and non-vanilla softmax types are refused in the packed path. Splitting needs
``cu_seqlens`` on the host (one sync per layer: fine on CPU, and TE takes the GPU path).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention


class VarlenDotProductAttention(DotProductAttention):
    """DotProductAttention that honours ``packed_seq_params.cu_seqlens_q/kv`` (THD) with per-sequence causal SDPA."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        # the scale the scores are finally multiplied by (megatron divides by the layer number before the
        # matmul and FusedScaleMaskSoftmax multiplies by it again)
        self.effective_softmax_scale = self.softmax_scale * (
            self.layer_number if self.config.apply_query_key_layer_scaling else 1.0)
        self.window = is_layer_window_attention(self.config.window_size, self.config.window_attn_skip_freq,
                                                layer_number)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [t, np, hn], key / value [t, ng, hn] (THD) -> [t, np * hn]; otherwise megatron's forward."""
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by VarlenDotProductAttention")
        if self.window or self.config.softmax_type != "vanilla":
            raise NotImplementedError("packed (THD) attention on the local spec supports neither window attention "
                                      "nor non-vanilla softmax types; use the TransformerEngine spec")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise NotImplementedError(f"packed (THD) attention on the local spec is causal only, got {mask_type}")
        cu_q = packed_seq_params.cu_seqlens_q_padded
        if cu_q is None:
            cu_q = packed_seq_params.cu_seqlens_q
        cu_kv = packed_seq_params.cu_seqlens_kv_padded
        if cu_kv is None:
            cu_kv = packed_seq_params.cu_seqlens_kv
        bounds_q = [int(x) for x in cu_q.tolist()]
        bounds_kv = [int(x) for x in cu_kv.tolist()]
        if bounds_q != bounds_kv:
            raise NotImplementedError("packed (THD) self-attention needs cu_seqlens_q == cu_seqlens_kv")
        if query.dim() != 3 or bounds_q[-1] != query.shape[0]:
            raise ValueError(f"packed query {tuple(query.shape)} does not match cu_seqlens ending at {bounds_q[-1]}")
        rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if rep > 1:
            key = key.repeat_interleave(rep, dim=1)
            value = value.repeat_interleave(rep, dim=1)
        p = self.attention_dropout.p if self.training else 0.0
        outs = []
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with rng:
            for s, e in zip(bounds_q[:-1], bounds_q[1:]):
                if e == s:
                    continue
                q, k, v = (x[s:e].transpose(0, 1) for x in (query, key, value))  # [heads, L, hn]
                o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                   scale=self.effective_softmax_scale)
                outs.append(o.transpose(0, 1))  # [L, heads, hn]
        ctx = torch.cat(outs, dim=0) if outs else query.new_zeros(query.shape)
        return ctx.reshape(ctx.shape[0], self.hidden_size_per_partition)

