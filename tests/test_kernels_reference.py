"""Float64 plain-loop references for the kernel tests, and hand-worked checks of the references themselves.

Other tests/test_kernels_*.py import the helpers from here (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import math

import pytest
import torch


def ref_logprobs_loops(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, temperature: float = 1.0):
    """(logp [N], entropy [N]) in float64 by explicit per-row loops over the first `vocab_size` columns.

    Labels < 0 give logp 0 (the kernels' "ignore" convention).
    """
    rows = logits.detach().double().tolist()
    lps, ents = [], []
    for row, y in zip(rows, labels.tolist()):
        z = [v / temperature for v in row[:vocab_size]]
        m = max(z)
        lse = m + math.log(math.fsum(math.exp(v - m) for v in z))
        ent = -math.fsum(math.exp(v - lse) * (v - lse) for v in z)
        lps.append(z[y] - lse if y >= 0 else 0.0)
        ents.append(ent)
    return torch.tensor(lps, dtype=torch.float64), torch.tensor(ents, dtype=torch.float64)


def ref_logprob_grads(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, temperature: float,
                      w_logp: torch.Tensor, w_ent: torch.Tensor | None) -> torch.Tensor:
    """d/dlogits of Σ w_logp·logp + Σ w_ent·entropy, float64, by autograd through log_softmax (a second,
    independent implementation); padded columns (>= vocab_size) get 0."""
    x = logits.detach().double().requires_grad_()
    lp = torch.log_softmax(x[:, :vocab_size] / temperature, dim=-1)
    keep = labels >= 0
    tok = lp.gather(1, labels.clamp_min(0)[:, None])[:, 0] * keep
    obj = (w_logp.double() * tok).sum()
    if w_ent is not None:
        obj = obj + (w_ent.double() * -(lp.exp() * lp).sum(-1)).sum()
    obj.backward()
    return x.grad


def ref_rfpo_loss_loops(logp, old_logp, adv, cu_seqlens, log_roff, clip_low, clip_high, clip_c, form):
    """(loss [N], dloss/dlogp [N]) in float64 by a plain loop over sequences and tokens (algorithms.md, RFPO 5).

    R' = R (faithful) or 1 (corrected); the dual-clip bound is −c·R'·A (clipped-branch advantage); the log-ratio
    is clamped to ±20 before exp. Gradient by hand: d r/d logp = r; the unclipped branch gives −A·r; the clipped
    branch gives −R'·A·r inside [1−ε_low, 1+ε_high] and 0 outside; the dual clip is constant; a clamped
    log-ratio gives 0. (Ties have measure zero here.)
    """
    lp, old, A = logp.double().tolist(), old_logp.double().tolist(), adv.double().tolist()
    cu, lr = cu_seqlens.tolist(), log_roff.double().tolist()
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    loss, grad = [0.0] * len(lp), [0.0] * len(lp)
    for s in range(len(cu) - 1):
        R = math.exp(lr[s])
        Rp = R if form == "faithful" else 1.0
        for t in range(cu[s], cu[s + 1]):
            d = lp[t] - old[t]
            r = math.exp(min(max(d, -20.0), 20.0)) * R  # log-ratio clamp ±20 (registry convention)
            l1 = -A[t] * r
            rc = min(max(r, lo), hi)
            l2 = -rc * Rp * A[t]
            if l1 >= l2:
                L, g = l1, -A[t] * r
            else:
                L, g = l2, (-Rp * A[t] * r if lo <= r <= hi else 0.0)
            if clip_c is not None and A[t] < 0 and -clip_c * Rp * A[t] < L:
                L, g = -clip_c * Rp * A[t], 0.0
            if abs(d) > 20.0:
                g = 0.0
            loss[t], grad[t] = L, g
    return torch.tensor(loss, dtype=torch.float64), torch.tensor(grad, dtype=torch.float64)


# ------------------------------------------------------------------------------ hand-worked checks of the refs
def test_ref_logprobs_hand_case():
    # softmax([0, ln2, ln3]) = [1/6, 2/6, 3/6]; padded 4th column ignored via vocab_size=3.
    logits = torch.tensor([[0.0, math.log(2), math.log(3), 99.0]], dtype=torch.float64)
    lp, ent = ref_logprobs_loops(logits, torch.tensor([2]), vocab_size=3)
    assert lp.item() == pytest.approx(math.log(0.5), abs=1e-12)
    h = -(1 / 6 * math.log(1 / 6) + 2 / 6 * math.log(2 / 6) + 3 / 6 * math.log(3 / 6))
    assert ent.item() == pytest.approx(h, abs=1e-12)
    # temperature 2: softmax([0, ln2/2, ln3/2]) ∝ [1, √2, √3]
    lp2, _ = ref_logprobs_loops(logits, torch.tensor([0]), vocab_size=3, temperature=2.0)
    assert lp2.item() == pytest.approx(-math.log(1 + math.sqrt(2) + math.sqrt(3)), abs=1e-12)


def test_ref_grads_hand_case():
    # d logp_y / d z_j = 1[j=y] - p_j ; padded column gets 0.
    logits = torch.tensor([[0.0, math.log(2), math.log(3), 5.0]], dtype=torch.float64)
    g = ref_logprob_grads(logits, torch.tensor([1]), 3, 1.0, torch.ones(1), None)
    assert torch.allclose(g, torch.tensor([[-1 / 6, 1 - 2 / 6, -3 / 6, 0.0]], dtype=torch.float64), atol=1e-12)


def test_ref_loss_hand_cases():
    cu = torch.tensor([0, 1, 2, 3])
    logp = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.1)])
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 2.0])
    lr = torch.tensor([0.0, 0.0, math.log(2.0)])
    # tok0: r=1.5 > 1.2, A>0: L = -min(1.5, 1.2) = -1.2, clipped -> grad 0
    # tok1: r=0.5 < 0.8, A<0: L = -min(-0.5, -0.8) = 0.8, clipped -> grad 0; dual c=3: min(0.8, 3) = 0.8
    # tok2: R=2, r=2.2, faithful: L = -min(2.2*2, clip(2.2)*2*2 = 4.8) = -4.4 -> unclipped branch, grad -A*r = -4.4
    loss, grad = ref_rfpo_loss_loops(logp, old, adv, cu, lr, 0.2, 0.2, 3.0, "faithful")
    assert loss.tolist() == pytest.approx([-1.2, 0.8, -4.4])
    assert grad.tolist() == pytest.approx([0.0, 0.0, -4.4])
    # corrected tok2: L = -min(4.4, 1.2*2) = -2.4, r outside the range -> grad 0
    loss_c, grad_c = ref_rfpo_loss_loops(logp, old, adv, cu, lr, 0.2, 0.2, None, "corrected")
    assert loss_c[2].item() == pytest.approx(-2.4) and grad_c[2].item() == 0.0
    # inside the range: r = 1.1, A = 1, R = 1: L = -1.1, grad -1.1
    l_in, g_in = ref_rfpo_loss_loops(torch.tensor([math.log(1.1)]), torch.zeros(1), torch.ones(1),
                                     torch.tensor([0, 1]), torch.zeros(1), 0.2, 0.2, None, "faithful")
    assert l_in.item() == pytest.approx(-1.1) and g_in.item() == pytest.approx(-1.1)
    # dual clip active: r = 10, A = -1: PPO loss 10, c = 3 -> 3, grad 0
    l_d, g_d = ref_rfpo_loss_loops(torch.tensor([math.log(10.0)]), torch.zeros(1), -torch.ones(1),
                                   torch.tensor([0, 1]), torch.zeros(1), 0.2, 0.2, 3.0, "faithful")
    assert l_d.item() == pytest.approx(3.0) and g_d.item() == 0.0
