"""Forward(-backward) through megatron's pipeline schedule with per-token log-probs from the vocab-parallel kernel.

``run_schedule`` feeds PackedMicroBatches through ``get_forward_backward_func``
(no pipelining, 1F1B when PP > 1, megatron's interleaved 1F1B over several model
chunks with virtual PP; see `interleaved_group_size` for its micro-batch count rule) and calls an output function on the last
stage's [b, T, V/tp] logits. ``logprob_output_fn`` builds the usual one: the
logits are reduced to the response rows [N, V/tp] and turned into log-probs and
entropies by ``rfpo_megatron.kernels.logprob.vocab_parallel_logprobs``; a
caller-provided ``token_fn(mb, logp [N], entropy [N]) -> (loss, stats)`` turns
those into the (already globally normalised) loss of the micro-batch.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from rfpo_megatron.actor import router_replay
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


_PENDING_SENDS: list = []  # gloo shape sends of the running interleaved schedule (waited for at its end)


def _ordered_communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    """``P2PCommunicator._communicate_shapes`` (megatron 0.16.1, ``variable_seq_lengths``) with a consistent order.

    Megatron posts send_prev, recv_prev, send_next, recv_next. When the previous and the next stage are the
    same rank (PP = 2), the interleaved schedule's combined forward+backward exchange sends two shape
    messages to that rank (the grad's first) while that rank posts its receives activation first; equal tags
    match in posting order, so the two shapes are swapped whenever the micro-batches differ in length. Here
    both sides post sends as (next, prev) and receives as (prev, next). On gloo a send completes only once
    the peer posts the receive, and a shape the peer takes only after this rank's next data send would
    deadlock (all of PP rank 0's micro-batches in warm-up, e.g. M = PP); the sends are therefore not
    waited for here but at the end of the schedule, as NCCL's eager small sends behave.
    """
    ref = tensor_send_next if tensor_send_next is not None else tensor_send_prev
    if ref is not None:
        dev = ref.device
    else:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    sends, recvs = [], []
    for t, peer in ((tensor_send_next, self.next_rank), (tensor_send_prev, self.prev_rank)):
        if t is not None:
            sends.append((torch.tensor(t.size(), device=dev, dtype=torch.int64), peer))
    bufs = {}
    for flag, key, peer in ((recv_prev, "prev", self.prev_rank), (recv_next, "next", self.next_rank)):
        if flag:
            bufs[key] = torch.empty((3,), device=dev, dtype=torch.int64)
            recvs.append((bufs[key], peer))
    if dist.get_backend(self.pp_group) == "gloo":
        for t, peer in sends:
            _PENDING_SENDS.append((dist.isend(t, peer, group=self.pp_group), t))
        for req in [dist.irecv(t, peer, group=self.pp_group) for t, peer in recvs]:
            req.wait()
    else:
        ops = [dist.P2POp(dist.isend, t, peer, self.pp_group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, self.pp_group) for t, peer in recvs]
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            torch.cuda.synchronize()
    return (bufs["prev"].tolist() if "prev" in bufs else [0, 0, 0],
            bufs["next"].tolist() if "next" in bufs else [0, 0, 0])


@contextlib.contextmanager
def _interleaved_p2p_fix():
    """Install `_ordered_communicate_shapes` for one interleaved schedule run; complete its sends at the end."""
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    orig = P2PCommunicator.__dict__["_communicate_shapes"]
    P2PCommunicator._communicate_shapes = _ordered_communicate_shapes
    try:
        yield
    finally:
        P2PCommunicator._communicate_shapes = orig
        while _PENDING_SENDS:
            _PENDING_SENDS.pop(0)[0].wait()


def interleaved_group_size(num_microbatches: int, pp: int) -> int:
    """``microbatch_group_size_per_vp_stage`` for megatron's interleaved schedule with ``num_microbatches >= pp``.

    Megatron 0.16.1 (``forward_backward_pipelining_with_interleaving``) runs the micro-batches in groups of
    N per model chunk and requires ``pp <= N <= M`` and ``M % N == 0`` or ``M % N >= pp``. Its default
    N = pp therefore needs M to be a multiple of pp; the smallest valid N >= pp is chosen instead (N = pp
    whenever pp divides M), so every count M >= pp runs without extra work. Only the schedule's order
    changes with N, never what is computed.
    """
    if num_microbatches < pp:
        raise ValueError(f"interleaved schedule: {num_microbatches} micro-batches < pipeline size {pp}")
    for n in range(pp, num_microbatches + 1):
        r = num_microbatches % n
        if r == 0 or r >= pp:
            return n
    return num_microbatches  # unreachable: N = M always qualifies


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

    Several ``model_chunks`` (virtual PP) use megatron's interleaved schedule: every chunk
    gets its own iterator over the same micro-batches. It needs at least PP micro-batches;
    fewer are padded with copies of the smallest one whose loss is ``0 * sum(output)``
    (exactly zero gradient; their stats are dropped), so any ``actor.max_tokens_per_gpu`` /
    ``actor.micro_batch_size`` works. Counts >= PP run unpadded (`interleaved_group_size`).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    items = [(mb, False) for mb in micro_batches]
    n_real = len(items)
    interleaved = len(model_chunks) > 1
    if interleaved:
        pp = mpu.get_pipeline_model_parallel_world_size()
        if n_real < pp:
            smallest = min(micro_batches, key=lambda m: int(m.input_ids.numel()))
            items += [(smallest, True)] * (pp - n_real)
        group = interleaved_group_size(len(items), pp)
        for m in model_chunks:
            c = _unwrap(m).config
            c.microbatch_group_size_per_vp_stage = group
            # megatron's batched p2p posts two sends to one peer at PP = 2 (see _ordered_communicate_shapes);
            # its unbatched ops order the two directions (even/odd ranks, two communicators at PP = 2)
            c.batch_p2p_comm = False

    def loss_func(mb: PackedMicroBatch, pad: bool, output_tensor: torch.Tensor):
        if pad:  # padding for the interleaved schedule: contributes nothing
            return output_tensor.sum() * 0.0, torch.zeros((), dtype=torch.int, device=output_tensor.device), {}
        loss, stats = output_fn(mb, output_tensor)
        zero_tokens = torch.zeros((), dtype=torch.int, device=loss.device)
        return loss, zero_tokens, stats

    rows_only = bool(getattr(output_fn, "response_rows_only", False))

    def forward_step(data_iterator, model):
        mb, pad = next(data_iterator)
        set_response_rows(model, mb.label_rows if rows_only else None)
        # MoE routing replay: this micro-batch's rollout experts (None clears them); no-op without MoE
        router_replay.set_targets(model, mb.routed_target, mb.routed_count,
                                  sequence_parallel=bool(_unwrap(model).config.sequence_parallel))
        out = model(
            mb.input_ids,
            mb.position_ids,
            None,
            packed_seq_params=mb.packed_seq_params,
        )
        return out, lambda t, _mb=mb, _pad=pad: loss_func(_mb, _pad, t)

    for m in model_chunks:
        if not _unwrap(m).config.calculate_per_token_loss:
            raise RuntimeError("the actor's model config must have calculate_per_token_loss=True")
    seq_len = max(int(mb.input_ids.shape[1]) for mb in micro_batches)
    mbs = max(int(mb.input_ids.shape[0]) for mb in micro_batches)
    fb = get_forward_backward_func()
    with _interleaved_p2p_fix() if interleaved else contextlib.nullcontext():
        out = fb(
        forward_step_func=forward_step,
            data_iterator=[iter(items) for _ in model_chunks] if interleaved else iter(items),
            model=list(model_chunks) if interleaved else model_chunks[0],
            num_microbatches=len(items),
            seq_length=seq_len,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )
    return list(out)[:n_real] if out else []


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
