"""Tensor-parallel vocab_parallel_logprobs over real gloo processes (tp = 2, 4): equal to the tp = 1 result.

Each rank builds the same full logits from a seed, keeps its vocab slice, runs forward + backward with
tp_group = WORLD (Triton interpreter and torch twin), all-gathers its logits-gradient slice and compares
logp, entropy and the full gradient with the single-process (tp = 1) result and the float64 reference.
Shards are 300 or 150 columns (not multiples of the 128 block), vocab padding covers a partial shard and, for
tp = 4, one whole shard; labels sit on every shard boundary; one row is ignored (label -100).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

V_PAD = 600
N = 40
# (dtype, true vocab size, temperature, entropy weight, inplace backward)
CASES = [
    (torch.float32, 590, 1.0, 0.5, False),
    (torch.float32, 430, 0.8, -0.3, True),  # tp=4: rank 3 (ids 450..599) holds only padding
    (torch.bfloat16, 577, 1.2, 0.7, False),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case_inputs(dtype, vocab, world):
    g = torch.Generator().manual_seed(1234)
    logits = (torch.randn(N, V_PAD, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (N,), generator=g)
    v_local = V_PAD // world
    edges = []
    for r in range(world):
        lo = r * v_local
        edges += [lo - 1, lo, lo + v_local - 1, lo + v_local]
    edges = [e for e in edges if 0 <= e < vocab] + [0, vocab - 1]
    labels[: len(edges)] = torch.tensor(edges)
    labels[-1] = -100  # an ignored row
    w_lp = torch.randn(N, generator=g)
    return logits, labels, w_lp


def _forward_backward(fn, logits, labels, vocab, temp, w_ent, inplace, group):
    leaf = logits.clone().requires_grad_()
    x = leaf * 1 if inplace else leaf
    lp, ent = fn(x, labels, tp_group=group, temperature=temp, vocab_size=vocab, inplace_backward=inplace)
    w_lp = _case_inputs(logits.dtype, vocab, 1)[2]
    ((w_lp * lp).sum() + w_ent * ent.sum()).backward()
    return lp.detach(), ent.detach(), leaf.grad


def _worker(rank, world, port):
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from rfpo_megatron.kernels.logprob import vocab_parallel_logprobs_torch, vocab_parallel_logprobs_triton
        from test_kernels_reference import ref_logprobs_loops

        group = dist.group.WORLD
        v_local = V_PAD // world
        for dtype, vocab, temp, w_ent, inplace in CASES:
            logits, labels, _ = _case_inputs(dtype, vocab, world)
            shard = logits[:, rank * v_local:(rank + 1) * v_local].contiguous()
            ref_lp, ref_ent = ref_logprobs_loops(logits, labels, vocab, temp) if rank == 0 else (None, None)
            tol = 1e-5 if dtype == torch.float32 else 1e-4
            for name, fn in (("torch", vocab_parallel_logprobs_torch), ("triton", vocab_parallel_logprobs_triton)):
                lp, ent, g = _forward_backward(fn, shard, labels, vocab, temp, w_ent, inplace, group)
                parts = [torch.empty_like(g) for _ in range(world)]
                dist.all_gather(parts, g.contiguous(), group=group)
                if rank != 0:  # every rank got the same logp/entropy from the all-reduces; rank 0 checks
                    continue
                g_full = torch.cat(parts, dim=1)
                lp1, ent1, g1 = _forward_backward(fn, logits, labels, vocab, temp, w_ent, inplace, None)
                tag = f"tp={world} {name} {dtype} vocab={vocab}"
                assert (lp - lp1).abs().max() <= 2e-6, tag
                assert (ent - ent1).abs().max() <= 2e-6, tag
                if dtype == torch.float32:
                    assert (g_full - g1).abs().max() <= 1e-6, tag
                else:  # bf16 gradients: at most one bf16 rounding apart
                    assert torch.all((g_full.float() - g1.float()).abs() <= g1.float().abs() * 2.0**-7 + 1e-6), tag
                assert torch.all(g_full[:, vocab:] == 0), tag
                assert (lp.double() - ref_lp).abs().max() <= tol, tag
                assert (ent.double() - ref_ent).abs().max() <= tol, tag
            # all ranks hold identical [N] outputs
            both = [torch.empty(2, N) for _ in range(world)]
            dist.all_gather(both, torch.stack([lp, ent]), group=group)
            assert all(torch.equal(b, both[0]) for b in both), f"tp={world}: ranks disagree"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_equals_tp1(world):
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)
