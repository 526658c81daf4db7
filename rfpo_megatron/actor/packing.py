"""Dynamic micro-batching by a token budget and packing of variable-length sequences.

Two layouts for one micro-batch of sequences ``seqs[i]`` of length ``L_i``:

* ``"pad"`` (CPU / local spec): right-padded ``[b, T_max]``; causal attention
  alone keeps real tokens from seeing the padding, so no attention mask is
  needed. Cost counted as ``b * T_max`` tokens.
* ``"thd"`` (GPU / TransformerEngine): all sequences concatenated into
  ``[1, sum L_i]`` with ``PackedSeqParams(qkv_format="thd", cu_seqlens)``;
  position ids restart at 0 for each sequence. Cost counted as ``sum L_i``.
  Runs on both specs: TE's attention on GPU, ``varlen_attention`` (per-sequence
  causal SDPA) with the local spec (``actor.packing``, docs/actor.md).

The split is a deterministic function of the lengths, so every rank of a
TP/PP group builds the same micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


def split_for_dp(lengths: Sequence[int], dp: int) -> list[list[int]]:
    """Sample indices per data-parallel rank, balanced by token count.

    Greedy longest-first onto the least-loaded rank; each rank's indices are
    returned sorted. Deterministic (ties broken by index / rank).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    loads = [0] * dp
    out: list[list[int]] = [[] for _ in range(dp)]
    for i in order:
        r = min(range(dp), key=lambda k: (loads[k], len(out[k]), k))
        out[r].append(i)
        loads[r] += int(lengths[i])
    return [sorted(x) for x in out]


def make_microbatches(
    lengths: Sequence[int],
    *,
    max_tokens: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
    layout: str = "pad",
) -> list[list[int]]:
    """Partition sample indices into micro-batches (keeps the input order).

    With ``max_tokens``: greedy, a micro-batch is closed when adding the next
    sample would exceed the budget (``b * T_max`` for "pad", ``sum L`` for
    "thd"); a single sample longer than the budget gets a micro-batch of its
    own. Otherwise fixed ``micro_batch_size`` samples per micro-batch.
    """
    n = len(lengths)
    if n == 0:
        return []
    if max_tokens is None:
        mbs = int(micro_batch_size or 1)
        if mbs < 1:
            raise ValueError(f"actor.micro_batch_size={micro_batch_size} must be >= 1")
        return [list(range(i, min(i + mbs, n))) for i in range(0, n, mbs)]
    if max_tokens < 1:
        raise ValueError(f"actor.max_tokens_per_gpu={max_tokens} must be >= 1")
    if layout not in ("pad", "thd"):
        raise ValueError(f"layout={layout!r} must be 'pad' or 'thd'")
    out: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    cur_sum = 0
    for i in range(n):
        L = int(lengths[i])
        new_max = max(cur_max, L)
        cost = (len(cur) + 1) * new_max if layout == "pad" else cur_sum + L
        if cur and cost > max_tokens:
            out.append(cur)
            cur, cur_max, cur_sum = [], 0, 0
            new_max = L
        cur.append(i)
        cur_max = new_max
        cur_sum += L
    if cur:
        out.append(cur)
    return out


@dataclass
class PackedMicroBatch:
    """Model inputs for one micro-batch plus the rows that hold response-token predictions.

    input_ids:    [b, T] (pad) or [1, sum L] (thd) int64.
    position_ids: same shape as input_ids.
    packed_seq_params: megatron PackedSeqParams for thd, else None.
    label_rows:   [N] int64 flat row indices into the [b*T] logits whose next
                  token is a response token (N = sum of response lengths).
    labels:       [N] int64 the response token ids those rows predict.
    sample_ids:   indices (into the caller's batch) of the samples, in order.
    resp_lens:    [len(sample_ids)] response lengths, the split sizes of [N].
    routed_target: [b*T, num_layers, k] int64 rollout expert ids in the MoE routers' token order (-1 = own
                  routing), or None; routed_count: [b*T] bool response-scoring rows
                  (``router_replay.microbatch_targets``).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    packed_seq_params: Optional[object]
    label_rows: torch.Tensor
    labels: torch.Tensor
    sample_ids: list[int]
    resp_lens: list[int]
    routed_target: Optional[torch.Tensor] = None
    routed_count: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        """Number of response tokens N."""
        return int(self.labels.numel())


def pack_microbatch(
    input_ids: Sequence[torch.Tensor],
    prompt_lens: Sequence[int],
    sample_ids: Sequence[int],
    *,
    layout: str = "pad",
    pad_id: int = 0,
    device: torch.device | str = "cpu",
    pad_to_multiple: int = 1,
    routed_experts: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> PackedMicroBatch:
    """Build a PackedMicroBatch from per-sample token ids.

    input_ids[i]: [L_i] prompt + response ids; the response is
    ``input_ids[i][prompt_lens[i]:]`` (prompt_lens[i] >= 1). Response token at
    position p is predicted by the logits at p - 1.

    pad_to_multiple: the sequence dimension is padded with ``pad_id`` to a multiple of it (sequence
    parallelism needs TP, context parallelism 2*CP). "pad": T_max is rounded up. "thd": the packed length
    sum L is rounded up by a padding tail that is one more (dummy) sequence in cu_seqlens, so no real token
    attends to it and its RoPE positions restart at 0; label rows never point into it.

    routed_experts: per-sample rollout routing ([L_i - 1, num_layers, k] or None, indexed like input_ids) for
    MoE router replay; sets ``routed_target`` / ``routed_count``.
    """
    mult = int(pad_to_multiple)
    if mult < 1:
        raise ValueError(f"pad_to_multiple={pad_to_multiple} must be >= 1")
    seqs = [input_ids[i].reshape(-1).long() for i in sample_ids]
    plens = [int(prompt_lens[i]) for i in sample_ids]
    lens = [int(s.numel()) for s in seqs]
    resp_lens = [L - p for L, p in zip(lens, plens)]
    for i, p, L in zip(sample_ids, plens, lens):
        if p < 1 or p > L:
            raise ValueError(f"batch.prompt_lens[{i}]={p} must be in [1, len(input_ids[{i}])={L}]")
    rows: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    psp = None
    if layout == "pad":
        T = -(-max(lens) // mult) * mult
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : s.numel()] = s
            rows.append(b * T + torch.arange(plens[b] - 1, lens[b] - 1))
            labels.append(s[plens[b]:])
        pos = torch.arange(T).unsqueeze(0).expand(len(seqs), T).contiguous()
    elif layout == "thd":
        from megatron.core.packed_seq_params import PackedSeqParams

        tail = -sum(lens) % mult
        pieces = seqs + ([torch.full((tail,), pad_id, dtype=torch.long)] if tail else [])
        ids = torch.cat(pieces).unsqueeze(0)
        pos = torch.cat([torch.arange(L) for L in lens + ([tail] if tail else [])]).unsqueeze(0)
        offs = [0]
        for L in lens + ([tail] if tail else []):
            offs.append(offs[-1] + L)
        for b, s in enumerate(seqs):
            rows.append(offs[b] + torch.arange(plens[b] - 1, lens[b] - 1))
            labels.append(s[plens[b]:])
        cu = torch.tensor(offs, dtype=torch.int32, device=device)
        psp = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=max(lens + [tail]),
            max_seqlen_kv=max(lens + [tail]),
        )
    else:
        raise ValueError(f"layout={layout!r} must be 'pad' or 'thd'")
    target = count = None
    if routed_experts is not None:
        from rfpo_megatron.actor.router_replay import microbatch_targets

        target, count = microbatch_targets([routed_experts[i] for i in sample_ids], lens, plens, layout=layout,
                                           seq_len=int(ids.shape[1]))
    return PackedMicroBatch(
        input_ids=ids.to(device),
        position_ids=pos.to(device),
        packed_seq_params=psp,
        label_rows=torch.cat(rows).to(device),
        labels=torch.cat(labels).to(device),
        sample_ids=list(sample_ids),
        resp_lens=resp_lens,
        routed_target=None if target is None else target.to(device),
        routed_count=None if count is None else count.to(device),
    )
