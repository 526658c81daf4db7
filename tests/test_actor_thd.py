"""THD packing on CPU: the local spec's varlen core attention (`actor/varlen_attention.py`) + megatron's THD RoPE.

One spawned 2-rank gloo world, three layouts in turn (TP=2, PP=2, TP=1 x DP=2): a "pad" actor and a "thd" actor
start from the same weights; log-probs, entropies, one train step's metrics and the weights after it agree
within 1e-5; a THD micro-batch padded to a multiple (a dummy tail sequence) gives the same log-probs. At TP=1
the varlen module is also checked against megatron's DotProductAttention sequence by sequence (GQA, query-key
layer scaling, a zero-length sequence).
"""

from __future__ import annotations

import pytest
import torch

from rfpo_megatron.actor.launch import spawn_world
from rfpo_megatron.actor.packing import pack_microbatch

HF = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
          intermediate_size=96, vocab_size=250, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
          max_position_embeddings=64)
LENGTHS = [(4, 5), (3, 9), (2, 5), (6, 14), (1, 6), (5, 3)]  # (prompt, response): uneven, several micro-batches
BUDGET = 40


def _batch():
    from rfpo_megatron.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, HF["vocab_size"], (p + r,), generator=g) for p, r in LENGTHS]
    b = ActorBatch(input_ids=ids, prompt_lens=[p for p, _ in LENGTHS])
    b.advantages = [torch.randn(r, generator=g) for _, r in LENGTHS]
    return b


def _actor(tp, pp, packing):
    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.config import ActorConfig

    return Actor(HF, ActorConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, packing=packing,
                                 lr=1e-2, adam_eps=1e-3, max_tokens_per_gpu=BUDGET), total_steps=3)


def _pad_vs_thd(tp, pp):
    """Both layouts from one start state: {layout: {logp, entropy, metrics, after}} (+ thd padded logp)."""
    import torch.distributed as dist

    from rfpo_megatron.config import AlgoConfig
    from rfpo_megatron.convert.sharding import gather_full_state, load_full_state

    b = _batch()
    pad = _actor(tp, pp, "pad")
    thd = _actor(tp, pp, "thd")
    assert (pad.layout, thd.layout) == ("pad", "thd")
    s0 = gather_full_state(pad.modules, vocab_size=HF["vocab_size"])
    load_full_state(thd.modules, s0, vocab_size=HF["vocab_size"])
    out = {"attn": type(thd.modules[0].decoder.layers[0].self_attention.core_attention).__name__,
           "pad_attn": type(pad.modules[0].decoder.layers[0].self_attention.core_attention).__name__}
    old = None
    for name, a in (("pad", pad), ("thd", thd)):
        lp, ent = a.compute_logprobs(b, compute_entropy=True)
        old = lp if old is None else old
        out[name] = {"logp": lp, "entropy": ent}
    thd.seq_multiple = 8  # padding tail: a dummy sequence of 1..7 tokens in cu_seqlens
    mbs = thd._my_microbatches(b)[1]
    out["tails"] = [int(mb.packed_seq_params.cu_seqlens_q[-1]) - int(mb.label_rows.max()) - 1 for mb in mbs]
    out["padded_lens"] = [int(mb.input_ids.shape[1]) for mb in mbs]
    out["thd_padded_logp"] = thd.compute_logprobs(b)[0]
    thd.seq_multiple = 1
    b.old_logp = old
    for name, a in (("pad", pad), ("thd", thd)):
        out[name]["metrics"] = a.train_step(b, AlgoConfig())
        full = gather_full_state(a.modules, vocab_size=HF["vocab_size"])
        # PP: each stage holds its layers; merge them on every rank
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, full)
        merged = {}
        for p in parts:
            merged.update(p)
        out[name]["after"] = merged
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, s0)
    out["s0"] = {k: v for p in parts for k, v in p.items()}
    return out


def _attention_module_check():
    """VarlenDotProductAttention (THD) vs megatron's DotProductAttention per sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from rfpo_megatron.actor.varlen_attention import VarlenDotProductAttention

    diffs = {}
    for scaling in (False, True):
        cfg = TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                kv_channels=16, apply_query_key_layer_scaling=scaling, use_cpu_initialization=True,
                                attention_dropout=0.0, hidden_dropout=0.0)
        ref = DotProductAttention(cfg, 3, AttnMaskType.causal, "self")
        var = VarlenDotProductAttention(cfg, 3, AttnMaskType.causal, "self")
        lens = [5, 0, 9, 1, 3]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        t = int(cu[-1])
        g = torch.Generator().manual_seed(1)
        q = torch.randn(t, 4, 16, generator=g)
        k = torch.randn(t, 2, 16, generator=g)
        v = torch.randn(t, 2, 16, generator=g)
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
        got = var(q, k, v, None, packed_seq_params=psp)
        want = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if e > s:  # [s, b=1, heads, d] -> [s, 1, hp]
                want.append(ref(q[s:e, None], k[s:e, None], v[s:e, None], None).squeeze(1))
        want = torch.cat(want)
        # bshd input: the varlen module is megatron's DotProductAttention
        bshd = (var(q[:9, None], k[:9, None], v[:9, None], None) - ref(q[:9, None], k[:9, None], v[:9, None], None))
        diffs[scaling] = (tuple(got.shape), float((got - want).abs().max()), float(bshd.abs().max()))
    return diffs


def _world(rank):
    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel

    out = {}
    for name, (tp, pp) in (("tp2", (2, 1)), ("pp2", (1, 2)), ("dp2", (1, 1))):
        init_parallel(tp=tp, pp=pp, seed=7)
        out[name] = _pad_vs_thd(tp, pp)
        if name == "dp2":
            out["attention"] = _attention_module_check()
        destroy_parallel(keep_process_group=True)
    return out


@pytest.fixture(scope="module")
def world():
    return spawn_world(_world, 2, timeout_s=400)


def _maxdiff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_thd_logprobs_equal_padded(world, layout):
    for rank, out in enumerate(world):
        w = out[layout]
        assert w["attn"] == "VarlenDotProductAttention" and w["pad_attn"] == "DotProductAttention"
        assert _maxdiff(w["thd"]["logp"], w["pad"]["logp"]) <= 1e-5, (layout, rank)
        assert _maxdiff(w["thd"]["entropy"], w["pad"]["entropy"]) <= 1e-5, (layout, rank)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_thd_padding_tail_changes_no_logprob(world, layout):
    for out in world:
        w = out[layout]
        assert all(n % 8 == 0 for n in w["padded_lens"]) and any(t > 0 for t in w["tails"])
        assert _maxdiff(w["thd_padded_logp"], w["thd"]["logp"]) <= 1e-6, layout


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_thd_train_step_equals_padded(world, layout):
    for out in world:
        w = out[layout]
        mp, mt = w["pad"]["metrics"], w["thd"]["metrics"]
        for k in ("train/loss", "train/pg_loss", "train/entropy", "train/grad_norm"):
            assert mt[k] == pytest.approx(mp[k], rel=1e-5, abs=1e-6), (layout, k)
        after_p, after_t = w["pad"]["after"], w["thd"]["after"]
        assert after_p.keys() == after_t.keys() and len(after_p) == 2 * 7 + 3  # 2 layers + embedding, norm, head
        diff = max(float((after_t[k] - after_p[k]).abs().max()) for k in after_p)
        print(f"{layout}: thd vs pad weights after one step {diff:.2e}, logp "
              f"{_maxdiff(w['thd']['logp'], w['pad']['logp']):.2e}, padded-tail logp "
              f"{_maxdiff(w['thd_padded_logp'], w['thd']['logp']):.2e}")
        assert diff <= 1e-5, layout
        assert max(float((after_p[k] - w["s0"][k]).abs().max()) for k in w["s0"]) > 1e-3  # the step moved weights


def test_varlen_module_equals_megatron_attention_per_sequence(world):
    for scaling, (shape, diff, bshd) in world[0]["attention"].items():
        assert shape == (18, 64), scaling
        assert diff <= 1e-6, scaling
        assert bshd == 0.0, scaling


# ------------------------------------------------------------------ packing (no world)
def test_pack_microbatch_pad_to_multiple_thd_tail_is_a_dummy_sequence():
    ids = [torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21, 22]), torch.tensor([30, 31, 32, 33, 34])]
    plain = pack_microbatch(ids, [2, 1, 4], [1, 2], layout="thd")
    mb = pack_microbatch(ids, [2, 1, 4], [1, 2], layout="thd", pad_id=7, pad_to_multiple=6)
    assert mb.input_ids.tolist() == [[20, 21, 22, 30, 31, 32, 33, 34, 7, 7, 7, 7]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert mb.packed_seq_params.cu_seqlens_q.tolist() == [0, 3, 8, 12] and mb.packed_seq_params.max_seqlen_q == 5
    assert torch.equal(mb.label_rows, plain.label_rows) and torch.equal(mb.labels, plain.labels)
    exact = pack_microbatch(ids, [2, 1, 4], [1, 2], layout="thd", pad_to_multiple=4)  # 8 % 4 == 0: no tail
    assert exact.packed_seq_params.cu_seqlens_q.tolist() == [0, 3, 8]
    pad = pack_microbatch(ids, [2, 1, 4], [0, 1], layout="pad", pad_to_multiple=3)
    assert pad.input_ids.shape == (2, 6) and pad.label_rows.tolist() == [1, 2, 6, 7]
    with pytest.raises(ValueError, match="pad_to_multiple"):
        pack_microbatch(ids, [2, 1, 4], [0], layout="thd", pad_to_multiple=0)


def test_packing_knob_resolves_and_is_validated():
    from rfpo_megatron.actor.model import resolve_layout
    from rfpo_megatron.config import ConfigError, load_config

    assert resolve_layout("auto", "local") == "pad"
    assert resolve_layout("thd", "local") == "thd" and resolve_layout("pad", "auto") == "pad"
    with pytest.raises(ValueError, match="actor.packing"):
        resolve_layout("bshd", "local")
    assert load_config(None, []).actor.packing == "auto"
    assert load_config(None, ["actor.packing=thd"]).actor.packing == "thd"
    with pytest.raises(ConfigError, match=r"actor\.packing"):
        load_config(None, ["actor.packing=packed"])
