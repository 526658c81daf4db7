"""Forward(-backward) through megatron's pipeline schedule with per-token log-probs from the vocab-parallel kernel.

``run_schedule`` feeds PackedMicroBatches through ``get_forward_backward_func``
(no pipelining, or 1F1B when PP > 1) and calls an output function on the last
stage's [b, T, V/tp] logits. ``logprob_output_fn`` builds the usual one: the
logits are reduced to the response rows [N, V/tp] and turned into log-probs and
entropies by ``rfpo_megatron.kernels.logprob.vocab_parallel_logprobs``; a
caller-provided ``token_fn(mb, logp [N], entropy [N]) -> (loss, stats)`` turns
those into the (already globally normalised) loss of the micro-batch.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from rfpo_megatron.actor.output_rows import set_response_rows
from rfpo_megatron.actor.packing import PackedMicroBatch
from rfpo_megatron.kernels.logprob import vocab_parallel_logprobs

TokenFn = Callable[[PackedMicroBatch, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


def _unwrap(m):
    while hasattr(m, "module"):
        m = m.module
    return m


def response_logits(output: torch.Tensor, mb: PackedMicroBatch) -> torch.Tensor:
    """Model output -> [N, V/tp] rows that predict the response tokens.

    The output is [1, N, V/tp] when the output layer computed the response rows only
    (``output_rows.ResponseRowsOutputLayer``, the default), else the full [b, T, V/tp] logits (b*T > N).
    """
    flat = output.reshape(-1, output.shape[-1])
    if flat.shape[0] == mb.label_rows.numel():
        return flat
    return flat.index_select(0, mb.label_rows)


OutputFn = Callable[[PackedMicroBatch, torch.Tensor], tuple[torch.Tensor, dict]]


def logprob_output_fn(
    token_fn: TokenFn,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    compute_entropy: bool = True,
    response_rows_only: bool = True,
) -> OutputFn:
    """Wrap ``token_fn`` into an output function: response-row logits -> kernel log-probs -> token_fn.

    ``response_rows_only``: the last stage computes logits (and their gradient) for the response rows only
    (``run_schedule`` reads the flag off the returned function); False computes all [b, T] rows and selects.
    """
    from megatron.core import parallel_state as mpu

    tp_group = mpu.get_tensor_model_parallel_group()

    def output_fn(mb: PackedMicroBatch, output_tensor: torch.Tensor):
        logits = response_logits(output_tensor, mb)
        logp, ent = vocab_parallel_logprobs(
            logits,
            mb.labels,
            tp_group=tp_group,
            temperature=temperature,
            vocab_size=vocab_size,
            compute_entropy=compute_entropy,
        )
        if ent is None:
            ent = torch.zeros_like(logp)
        return token_fn(mb, logp, ent)

    output_fn.response_rows_only = bool(response_rows_only)  # type: ignore[attr-defined]
    return output_fn


def run_schedule(
    model_chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[PackedMicroBatch],
    output_fn: OutputFn,
    *,
    forward_only: bool,
) -> list[dict]:
    """Run all micro-batches through the pipeline; returns output_fn's stats per micro-batch.

    ``output_fn(mb, output [b, T, V/tp]) -> (loss 0-dim, stats dict)`` runs on the
    last pipeline stage only, so the stats list is empty elsewhere. The loss is
    back-propagated as is (``calculate_per_token_loss`` is on and 0 tokens are
    reported, so megatron neither divides by the number of micro-batches nor
    rescales gradients: the caller's weights carry the global normalisation).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []

    def loss_func(mb: PackedMicroBatch, output_tensor: torch.Tensor):
        loss, stats = output_fn(mb, output_tensor)
        zero_tokens = torch.zeros((), dtype=torch.int, device=loss.device)
        return loss, zero_tokens, stats

    rows_only = bool(getattr(output_fn, "response_rows_only", False))

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        set_response_rows(model, mb.label_rows if rows_only else None)
        out = model(
            mb.input_ids,
            mb.position_ids,
            None,
            packed_seq_params=mb.packed_seq_params,
        )
        return out, lambda t, _mb=mb: loss_func(_mb, t)

    for m in model_chunks:
        if not _unwrap(m).config.calculate_per_token_loss:
            raise RuntimeError("the actor's model config must have calculate_per_token_loss=True")
    seq_len = max(int(mb.input_ids.shape[1]) for mb in micro_batches)
    mbs = max(int(mb.input_ids.shape[0]) for mb in micro_batches)
    fb = get_forward_backward_func()
    out = fb(
        forward_step_func=forward_step,
        data_iterator=iter(list(micro_batches)),
        model=list(model_chunks) if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )
    return list(out) if out else []


def pp_broadcast_from_last(t: torch.Tensor) -> torch.Tensor:
    """Broadcast a tensor of known shape from the last pipeline stage to the whole PP group (in place)."""
    from megatron.core import parallel_state as mpu

    if mpu.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            t,
            src=mpu.get_pipeline_model_parallel_last_rank(),
            group=mpu.get_pipeline_model_parallel_group(),
        )
    return t


def dp_sum(t: torch.Tensor) -> torch.Tensor:
    """All-reduce SUM over the data-parallel group (in place)."""
    from megatron.core import parallel_state as mpu

    if mpu.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=mpu.get_data_parallel_group())
    return t
