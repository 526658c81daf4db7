"""On a CUDA device: compiled Triton kernels vs the torch twin, and peak memory ≤ one bf16 [N, V] buffer + O(N)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_compiled_kernels_match_twin_and_fp32():
    from rfpo_megatron.kernels.logprob import vocab_parallel_logprobs, vocab_parallel_logprobs_torch
    from rfpo_megatron.kernels.loss import fused_rfpo_token_loss, fused_rfpo_token_loss_torch

    torch.manual_seed(0)
    n, v, vocab = 1000, 50304, 50257
    logits = (torch.randn(n, v, device="cuda") * 3).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device="cuda")
    outs = []
    for fn in (vocab_parallel_logprobs, vocab_parallel_logprobs_torch):
        x = logits.clone().requires_grad_()
        lp, ent = fn(x, labels, temperature=0.9, vocab_size=vocab)
        (lp.sum() + 0.3 * ent.sum()).backward()
        outs.append((lp, ent, x.grad))
    ref = (logits[:, :vocab].double() / 0.9).log_softmax(-1)
    assert (outs[0][0].double() - ref.gather(1, labels[:, None])[:, 0]).abs().max() <= 1e-4
    assert (outs[0][1].double() + (ref.exp() * ref).sum(-1)).abs().max() <= 1e-4
    for a, b in zip(outs[0], outs[1]):
        assert (a.float() - b.float()).abs().max() <= 1e-3
    cu = torch.tensor([0, 300, 301, 1000], device="cuda", dtype=torch.int32)
    lr = torch.tensor([0.0, 0.4, -0.3], device="cuda")
    old = outs[0][0].detach() + 0.2 * torch.randn(n, device="cuda")
    adv = torch.randn(n, device="cuda")
    a, _ = fused_rfpo_token_loss(outs[0][0].detach(), old, adv, cu, lr, 0.2, 0.28, 3.0)
    b, _ = fused_rfpo_token_loss_torch(outs[0][0].detach(), old, adv, cu, lr, 0.2, 0.28, 3.0)
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("inplace", [False, True])
def test_peak_memory_at_most_one_bf16_buffer(inplace):
    from rfpo_megatron.kernels.logprob import vocab_parallel_logprobs

    n, v = 8192, 32768
    logits = torch.randn(n, v, device="cuda").to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda")
    x = logits * 1 if inplace else logits
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = vocab_parallel_logprobs(x, labels, inplace_backward=inplace)
    torch.autograd.grad(lp.sum() + ent.sum(), x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    budget = (0 if inplace else 2 * n * v) + 64 * n + (1 << 20)  # gradient buffer + O(N) + allocator slack
    assert extra <= budget, f"peak extra {extra} B > {budget} B"
