"""Plain float64 reference implementations (python loops over groups/tokens) for the tests/test_algos_*.py."""

from __future__ import annotations

import math
import random

import torch


def make_groups(seed: int, sizes=(4, 1, 3, 5, 2), equal_group: int | None = 2, T: int = 7):
    """Rewards [B], shuffled non-contiguous group ids [B], ragged right-padded mask [B, T] (row lengths 1..T)."""
    rng = random.Random(seed)
    ids, rewards = [], []
    for g, n in enumerate(sizes):
        gid = 100 + 7 * g  # arbitrary, non-contiguous ids
        const = rng.choice([0.0, 1.0, 0.3])
        for _ in range(n):
            ids.append(gid)
            rewards.append(const if g == equal_group else rng.choice([0.0, 1.0, 0.5, -0.25, 2.0]))
    perm = list(range(len(ids)))
    rng.shuffle(perm)
    ids = [ids[p] for p in perm]
    rewards = [rewards[p] for p in perm]
    lens = [rng.randint(1, T) for _ in ids]
    lens[0] = T
    mask = [[1 if t < L else 0 for t in range(T)] for L in lens]
    return (
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(mask, dtype=torch.bool),
    )


def groups_of(ids):
    out: dict[int, list[int]] = {}
    for i, g in enumerate(ids):
        out.setdefault(int(g), []).append(i)
    return out


def ref_grpo(rewards, ids, norm=True, eps=1e-6):
    r = [float(x) for x in rewards]
    adv = [0.0] * len(r)
    for _, idx in groups_of(ids).items():
        vals = [r[i] for i in idx]
        n = len(vals)
        if n == 1 or max(vals) == min(vals):
            continue
        mu = sum(vals) / n
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (n - 1))
        for i in idx:
            adv[i] = (r[i] - mu) / (sd + eps) if norm else r[i] - mu
    return adv


def ref_rloo(rewards, ids):
    r = [float(x) for x in rewards]
    adv = [0.0] * len(r)
    for _, idx in groups_of(ids).items():
        if len(idx) == 1:
            continue
        for i in idx:
            others = [r[j] for j in idx if j != i]
            adv[i] = r[i] - sum(others) / len(others)
    return adv


def valid_positions(mask_row):
    return [t for t, v in enumerate(mask_row) if bool(v)]


def ref_kl(lp, ref, kind):
    d = ref - lp
    return {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[kind]


def ref_whiten(rows_vals, mask):
    """rows_vals: list of lists [B][T]; whiten over valid entries with unbiased var + 1e-8."""
    vals = [rows_vals[i][t] for i in range(len(mask)) for t in valid_positions(mask[i])]
    n = len(vals)
    mu = sum(vals) / n
    var = sum((v - mu) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
    out = [[0.0] * len(mask[0]) for _ in mask]
    for i in range(len(mask)):
        for t in valid_positions(mask[i]):
            out[i][t] = (rows_vals[i][t] - mu) / math.sqrt(var + 1e-8)
    return out


def ref_reinforce_pp(scores, mask, old, ref, beta, kind, gamma):
    B, T = len(mask), len(mask[0])
    rets = [[0.0] * T for _ in range(B)]
    for i in range(B):
        pos = valid_positions(mask[i])
        tok = {t: -beta * ref_kl(float(old[i][t]), float(ref[i][t]), kind) for t in pos}
        if pos:
            tok[pos[-1]] += float(scores[i])
        run = 0.0
        for t in reversed(pos):
            run = tok[t] + gamma * run
            rets[i][t] = run
    return ref_whiten(rets, mask), rets


def ref_gae(rewards, mask, values, gamma, lam):
    B, T = len(mask), len(mask[0])
    adv = [[0.0] * T for _ in range(B)]
    for i in range(B):
        pos = valid_positions(mask[i])
        nxt_v, nxt_a = 0.0, 0.0
        for k in reversed(range(len(pos))):
            t = pos[k]
            r_t = float(rewards[i]) if k == len(pos) - 1 else 0.0
            delta = r_t + gamma * nxt_v - float(values[i][t])
            a = delta + gamma * lam * nxt_a
            adv[i][t] = a
            nxt_v, nxt_a = float(values[i][t]), a
    return adv


# ---------------------------------------------------------------------------------------------- policy losses
# Each ref_* takes python floats for one token and returns (loss value, d loss / d logp) — the gradient the
# loss is DEFINED to have (stop-gradients respected), written from docs/algorithms.md.
def clip(x, lo, hi):
    return min(max(x, lo), hi)


def ref_ppo_tok(lp, old, A, R=1.0, form="faithful", el=0.2, eh=0.2, c=None, lo=None, hi=None):
    lo = 1 - el if lo is None else lo
    hi = 1 + eh if hi is None else hi
    x = math.exp(lp - old) * R
    Ac = A * R if form == "faithful" else A
    l1, l2 = -A * x, -Ac * clip(x, lo, hi)
    if l1 >= l2:
        val, grad = l1, -A * x
    else:  # the clipped branch: constant outside [lo, hi]; inside (possible when R != 1) it is −Ac·x
        val, grad = l2, (-Ac * x if lo < x < hi else 0.0)
    if c is not None and A < 0 and val > -c * Ac:
        val, grad = -c * Ac, 0.0
    return val, grad


def ref_gppo_tok(lp, old, A, el=0.2, eh=0.2, c=None):
    """Value of ppo; gradient weight per the piecewise definition (R = 1)."""
    val, _ = ref_ppo_tok(lp, old, A, el=el, eh=eh, c=c)
    rho = math.exp(lp - old)
    if rho < 1 - el and A < 0:
        w = 1 - el
    elif rho > 1 + eh and A > 0:
        w = 1 + eh
    else:
        w = rho
    if c is not None and A < 0 and rho > c:
        w = c
    return val, -A * w


def ref_cispo_tok(lp, old, A, R=1.0, form="faithful", el=0.2, eh=0.2):
    w = clip(math.exp(lp - old) * R, 1 - el, 1 + eh)
    Ac = A * R if form == "faithful" else A
    return -w * Ac * lp, -w * Ac


def ref_aspo_tok(lp, old, A, R=1.0, form="faithful", el=0.2, eh=0.2, c=None):
    x = math.exp(lp - old) * R
    Ac = A * R if form == "faithful" else A
    if A >= 0:
        if x > 1 + eh:
            return -Ac / (1 + eh), 0.0
        w = 1.0 / x  # flipped weight: value 1/rho, gradient (1/rho) dlogp
        if c is not None and w > c:
            return -Ac * c * lp, -Ac * c
        return -Ac * w, -Ac * w
    if x < 1 - el:
        return -Ac * (1 - el), 0.0
    if c is not None and x > c:
        return -Ac * c * lp, -Ac * c
    return -Ac * x, -Ac * x


def ref_ecpo_tok(lp, old, A, R=1.0, form="faithful", el=0.2, eh=0.2, delta=0.1, c=None):
    p, p_old = math.exp(lp), math.exp(old)
    q = max(p / (1 + eh + delta), p_old)
    x = p / q * R  # value; d x / d logp = x in both cases (q is either constant or sg(p)/K)
    Ac = A * R if form == "faithful" else A
    l1, l2 = -A * x, -Ac * clip(x, 1 - el, 1 + eh)
    val, grad = (l1, -A * x) if l1 >= l2 else (l2, -Ac * x if 1 - el < x < 1 + eh else 0.0)
    if c is not None and A < 0 and val > -c * Ac:
        val, grad = -c * Ac, 0.0
    return val, grad


def ref_reinforce_tok(lp, old, A, R=1.0, form="faithful"):
    Ac = A * R if form == "faithful" else A
    return -R * Ac * lp, -R * Ac


def ref_bapo_bounds(ratios, advs, rho0, a_lo, a_hi, b_lo, b_hi, d_hi, d_lo):
    """ratios/advs: flat lists over valid tokens. Plain while loops as described in algorithms.md."""

    def share(c_lo, c_hi):
        p = sum(x * a for x, a in zip(ratios, advs) if a > 0 and x <= c_hi)
        n = sum(x * -a for x, a in zip(ratios, advs) if a < 0 and x >= c_lo)
        return 1.0 if p + n == 0 else p / (p + n)

    c_lo, c_hi = a_lo, a_hi
    k = 0
    while share(c_lo, c_hi) < rho0 and c_hi < b_hi:
        k += 1
        c_hi = min(a_hi + k * d_hi, b_hi)
    k = 0
    while share(c_lo, c_hi) < rho0 and c_lo < b_lo:
        k += 1
        c_lo = min(a_lo + k * d_lo, b_lo)
    return c_lo, c_hi, share(c_lo, c_hi)
