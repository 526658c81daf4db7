"""Logits for the response rows only: the last stage's ``output_layer`` applied to the rows that predict a token.

GPTModel computes ``output_layer(hidden [s, b, h])`` for every position, and the backward of a row
selection made afterwards allocates a zero-filled ``[b*s, V/tp]`` gradient. ``enable_response_rows``
turns the model's ``output_layer`` (megatron's ColumnParallelLinear) into ``ResponseRowsOutputLayer``
(same parameters and state-dict names): while ``response_rows`` is set (``set_response_rows``, called per
micro-batch by ``forward.run_schedule``) it gathers the hidden states out of the sequence-parallel region
itself, keeps the listed rows (indices into the ``[b, s]`` flattening, ``PackedMicroBatch.label_rows``) and
applies the layer to ``[N, 1, h]`` without its own sequence-parallel gather, so GPTModel returns
``[1, N, V/tp]`` and the logits and their gradient hold N rows. ``response_rows=None`` is the full path.
"""

from __future__ import annotations

from typing import Optional

import torch


def _base():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    return ColumnParallelLinear


_CLS = None


def _row_class():
    global _CLS
    if _CLS is None:
        base = _base()

        class ResponseRowsOutputLayer(base):  # type: ignore[misc, valid-type]
            """ColumnParallelLinear that, with ``response_rows`` set, computes only those rows (see module doc)."""

            response_rows: Optional[torch.Tensor] = None

            def forward(self, input_, weight=None, runtime_gather_output=None):  # noqa: D401
                rows = self.response_rows
                if rows is None:
                    return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                sp = self.sequence_parallel
                if sp:
                    # forward all-gather, backward keeps this rank's slice: the full-sequence gradient is
                    # already summed over TP by the layer's input copy (copy_to_tensor_model_parallel_region)
                    input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False,
                                                                  group=self.tp_group)
                s, b, h = input_.shape
                # rows index [b, s]; the hidden states are [s, b]
                idx = (rows % s) * b + torch.div(rows, s, rounding_mode="floor")
                picked = input_.reshape(s * b, h).index_select(0, idx).unsqueeze(1)
                self.sequence_parallel = False
                try:
                    return super().forward(picked, weight=weight, runtime_gather_output=runtime_gather_output)
                finally:
                    self.sequence_parallel = sp

        _CLS = ResponseRowsOutputLayer
    return _CLS


def enable_response_rows(model) -> bool:
    """Make ``model.output_layer`` (a ColumnParallelLinear) row-selecting in place; False when it has none
    (not the last stage, or a critic's value head)."""
    layer = getattr(model, "output_layer", None)
    if layer is None or type(layer) is not _base():
        return isinstance(layer, _row_class())
    layer.__class__ = _row_class()
    layer.response_rows = None
    return True


def set_response_rows(model, rows: Optional[torch.Tensor]) -> bool:
    """Set (or clear, ``None``) the rows the model's row-selecting output layer computes; False if it has none."""
    while hasattr(model, "module"):
        model = model.module
    layer = getattr(model, "output_layer", None)
    if isinstance(layer, _row_class()):
        layer.response_rows = rows
        return True
    return False
