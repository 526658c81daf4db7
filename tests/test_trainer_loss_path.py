"""The trainer's actor-side path on a real (tiny) megatron actor: zero gradient for an all-wrong group under
GRPO, a nonzero one once the fix stage places a successful fix (RFPO); the log-prob pass scores fixed
samples on the PLAIN prompt's token ids; R_off is detached and equals a float64 reference; TIS weights
are 1 on fixed samples."""
from __future__ import annotations

import math
import os

import pytest
import torch

from test_trainer_fixtures import build_assets, tiny_overrides  # noqa: F401 (sys.path set up there)

from rfpo_megatron import train as T
from rfpo_megatron.actor.batch import pad_tokens
from rfpo_megatron.config import load_config
from rfpo_megatron.data.types import RolloutGroup, Sample


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A world-size-1 megatron actor built from the tiny HF model, plus tokenizer and config."""
    from transformers import AutoTokenizer

    from rfpo_megatron.actor.parallel import destroy_parallel, init_parallel
    from rfpo_megatron.rollout.procs import free_port

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("loss_path")
    assets = build_assets(str(root / "assets"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    init_parallel(1, 1, seed=5)
    tok = AutoTokenizer.from_pretrained(assets["model"])

    def make_cfg(*extra):
        return load_config(None, tiny_overrides(assets, str(root / "out")) + list(extra))

    yield {"tok": tok, "make_cfg": make_cfg}
    destroy_parallel()


def _enc(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _wrong_group(tok, record, n=4):
    """An all-wrong group for `record`: n distinct wrong answers, reward 0."""
    from rfpo_megatron.data.template import PromptFormat, encode_prompt, format_prompt

    fmt = PromptFormat(mode="auto")
    q = encode_prompt(tok, record["prompt"], fmt)
    samples = [Sample(prompt_ids=list(q), response_ids=_enc(tok, f"ans={int(record['answer']) + 1 + i}"),
                      reward=0.0, reward_message="wrong", record=record) for i in range(n)]
    for s in samples:
        s.rollout_logprobs = [-1.0] * len(s.response_ids)
        s.response_text = tok.decode(s.response_ids)
    return RolloutGroup(prompt_ids=list(q), samples=samples, record=record,
                        prompt_text=format_prompt(tok, record["prompt"], fmt))


RECORD = {"id": "t1", "prompt": "3+4", "answer": "7", "a": 3, "b": 4, "solution": "3+4+0=7 ans=7"}


class RecordingActor:
    """Wraps the real actor and keeps every ActorBatch given to compute_logprobs (no behaviour change)."""

    def __init__(self, actor):
        self.actor, self.batches = actor, []

    def compute_logprobs(self, batch, **kw):
        self.batches.append(batch)
        return self.actor.compute_logprobs(batch, **kw)


def _fix_with_correct_answer(env, cfg, group):
    """Run the real fix stage with an engine stand-in that answers correctly: returns (groups, fix prompts)."""
    from rfpo_megatron.fix import run_fix_stage
    from rfpo_megatron.rewards import get_reward_fn

    tok, seen = env["tok"], []

    def generate(prompt_ids, n, sampling):
        seen.extend(prompt_ids)
        ids = _enc(tok, "ans=7") + [tok.eos_token_id]
        return [[(ids, [-0.5] * len(ids), "stop")] * n for _ in prompt_ids]

    res = run_fix_stage([group], generate, get_reward_fn("arithmetic"), cfg, tok, seed=1)
    return res.groups, seen


def _step_params(actor):
    return [p.detach().clone() for m in actor.modules for p in m.parameters()]


def _run_update(cfg, actor, groups):
    """The trainer's update path for `groups`: returns (train metrics, batch, log_roff)."""
    batch = T.build_batch(groups)
    old, orig = T.logprob_pass(actor, batch)
    log_roff = T.compute_roff(cfg, batch, old, orig)
    adv = T.advantages(cfg, batch, old, None)
    step = T.make_step(cfg, batch, old, None, None, log_roff, adv)
    tb = step.actor_batch(with_roff=cfg.rfpo.enabled)
    return actor.train_step(tb, cfg.algo, cfg.rfpo if cfg.rfpo.enabled else None), batch, log_roff, step.advantages


def test_all_wrong_group_zero_grad_grpo_nonzero_rfpo(env):
    tok = env["tok"]
    # GRPO: the all-wrong group has zero advantage -> exactly zero gradient and unchanged weights
    cfg = env["make_cfg"]("rfpo.enabled=false")
    actor = T.build_actor(cfg)
    before = _step_params(actor)
    m, batch, log_roff, adv = _run_update(cfg, actor, [_wrong_group(tok, RECORD)])
    assert torch.count_nonzero(adv) == 0
    assert m["train/grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, _step_params(actor)))

    # RFPO: the fix stage places a successful fix -> variance in the group -> nonzero gradient
    cfg = env["make_cfg"]("rfpo.enabled=true", "rfpo.fix.max_per_group=1", "rfpo.fix.placement=replace")
    actor = T.build_actor(cfg)
    before = _step_params(actor)
    groups, _ = _fix_with_correct_answer(env, cfg, _wrong_group(tok, RECORD))
    assert groups[0].num_fixed == 1 and groups[0].rewards.count(1.0) == 1
    m, batch, log_roff, adv = _run_update(cfg, actor, groups)
    assert m["train/grad_norm"] > 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, _step_params(actor)))
    # GRPO advantage of the lone success in G=4: (1 - 1/4) / std_unbiased([1,0,0,0]) = 0.75 / 0.5 = 1.5
    row = batch.fixed_rows[0]
    assert adv[row, 0].item() == pytest.approx(1.5, rel=1e-4)


def test_logprob_pass_scores_fixed_sample_on_plain_prompt_ids(env):
    tok = env["tok"]
    cfg = env["make_cfg"]("rfpo.enabled=true", "rfpo.fix.max_per_group=1")
    group = _wrong_group(tok, RECORD)
    plain, wrong0 = list(group.prompt_ids), list(group.samples[0].response_ids)
    groups, fix_prompts = _fix_with_correct_answer(env, cfg, group)
    assert len(fix_prompts) == 1 and fix_prompts[0] != plain  # the fix really used a different prompt
    rec = RecordingActor(T.build_actor(cfg, with_optimizer=False))
    batch = T.build_batch(groups)
    T.logprob_pass(rec, batch)
    ab = rec.batches[0]
    row = batch.fixed_rows[0]
    fixed_ids = ab.input_ids[row].tolist()
    assert ab.prompt_lens[row] == len(plain)
    assert fixed_ids[:len(plain)] == plain  # (q, o_f) on the plain prompt q
    assert fixed_ids[len(plain):] == _enc(tok, "ans=7") + [tok.eos_token_id]
    fp = fix_prompts[0]
    assert fixed_ids[:len(fp)] != fp
    # the original wrong o is scored too, on the same plain prompt (for R_off)
    orig_ids = ab.input_ids[batch.n].tolist()
    assert orig_ids == plain + wrong0 and ab.prompt_lens[batch.n] == len(plain)
    assert len(ab) == batch.n + 1


def test_roff_detached_and_matches_float64_reference(env):
    tok = env["tok"]
    for mode, gamma, clip in (("seq_mean", 1.0, 2.0), ("seq_sum", 0.5, 0.3)):
        cfg = env["make_cfg"]("rfpo.enabled=true", f"rfpo.roff_mode={mode}", f"rfpo.gamma={gamma}",
                              f"rfpo.roff_clip={clip}")
        groups, _ = _fix_with_correct_answer(env, cfg, _wrong_group(tok, RECORD))
        batch = T.build_batch(groups)
        torch.manual_seed(0)
        old_rows = [torch.randn(len(r), requires_grad=True) for r in batch.response_ids]
        orig_rows = [torch.randn(len(o), requires_grad=True) for o in batch.orig_response_ids]
        lr = T.compute_roff(cfg, batch, pad_tokens(old_rows), pad_tokens(orig_rows))
        old, orig = old_rows, orig_rows
        assert not lr.requires_grad and lr.grad_fn is None
        row = batch.fixed_rows[0]
        f = [float(x) for x in old[row].detach().double()]
        o = [float(x) for x in orig[0].detach().double()]
        s_f, s_o = (sum(f), sum(o)) if mode == "seq_sum" else (sum(f) / len(f), sum(o) / len(o))
        want = max(-clip, min(clip, gamma * (s_o - s_f)))
        assert lr[row].item() == pytest.approx(want, abs=1e-6)
        assert all(lr[i].item() == 0.0 for i in range(batch.n) if i != row)


def test_tis_weights_are_one_for_fixed_samples(env):
    tok = env["tok"]
    cfg = env["make_cfg"]("rfpo.enabled=true", "algo.tis_cap=2.0")
    groups, _ = _fix_with_correct_answer(env, cfg, _wrong_group(tok, RECORD))
    batch = T.build_batch(groups)
    row = batch.fixed_rows[0]
    assert not batch.use_tis[row]
    torch.manual_seed(1)
    old = [torch.randn(len(r)) * 0.5 - 1.0 for r in batch.response_ids]
    adv = T.Advantages(torch.zeros(batch.response_mask.shape), batch.response_mask)
    tb = T.make_step(cfg, batch, pad_tokens(old), None, None, torch.zeros(batch.n), adv).actor_batch()
    assert torch.equal(tb.tis_weights[row], torch.ones(len(batch.response_ids[row])))
    for i in range(batch.n):
        if i == row:
            continue
        ro = groups[0].samples[i].rollout_logprobs
        want = [min(math.exp(float(a) - b), 2.0) for a, b in zip(old[i].tolist(), ro)]
        assert tb.tis_weights[i].tolist() == pytest.approx(want, rel=1e-6)


def test_colocated_release_then_sync_restores_every_weight(env, tmp_path):
    """rollout.colocate: the engine frees its weights during the update; the weight sync must re-create all of
    them: sampling afterwards equals the sampling before (same seed, same weights)."""
    from rfpo_megatron.rollout.launch import launch_embedded_server

    cfg = env["make_cfg"]("rollout.colocate=true")
    tok = env["tok"]
    rt = T.Runtime(cfg)
    rt.actor = T.build_actor(cfg, with_optimizer=False)
    rt.engine = launch_embedded_server(cfg.actor.hf_model_path, log_dir=str(tmp_path))
    try:
        prompt = _enc(tok, "<|user|>12+7<|assistant|>")
        params = T.sampling_params(cfg, 4, 123, [tok.eos_token_id], max_new_tokens=12)
        before = [r.output_ids for r in rt.engine.generate([prompt], params)[0]]
        rt.engine.release_memory()
        T.sync_weights(rt, resume_memory=True)
        after = [r.output_ids for r in rt.engine.generate([prompt], params)[0]]
    finally:
        rt.engine.shutdown()
    assert before == after and len(set(map(tuple, before))) > 1


# luffy in the slow lane: the knob test through Actor.train_step covers its formula by default; guide here covers
# the plumbing luffy does not need (the engine's fix log-probs through Step.actor_batch)
@pytest.mark.parametrize("mode", [pytest.param("luffy", marks=pytest.mark.slow), "guide"])
def test_offpolicy_shaping_through_update_policy(env, mode):
    """rfpo.offpolicy_shaping through the trainer's update (train.update_policy): at the first step (logp = old)
    the fixed row's per-token loss is −A·x/(x+c), x = exp(old) (luffy) or exp(old − fix_logp) with fix_logp the
    engine's log-probs of the fix under the fix prompt (−0.5 per token here; guide); the wrong rows keep the
    weighted PPO loss −A (ratio 1). train/pg_loss (token-mean) against that float64 sum."""
    from types import SimpleNamespace

    tok, c = env["tok"], 0.5
    cfg = env["make_cfg"]("rfpo.enabled=true", "rfpo.fix.max_per_group=1", "rfpo.fix.placement=replace",
                          f"rfpo.offpolicy_shaping={mode}", f"rfpo.shaping_c={c}")
    actor = T.build_actor(cfg)
    groups, _ = _fix_with_correct_answer(env, cfg, _wrong_group(tok, RECORD))
    batch = T.build_batch(groups)
    old, orig = T.logprob_pass(actor, batch)
    step = T.make_step(cfg, batch, old, None, None, T.compute_roff(cfg, batch, old, orig),
                       T.advantages(cfg, batch, old, None))
    m = T.update_policy(SimpleNamespace(cfg=cfg, actor=actor), step)
    total, n = 0.0, 0
    for i, resp in enumerate(batch.response_ids):
        for t in range(len(resp)):
            if not bool(step.loss_mask[i, t]):
                continue
            a, o = float(step.advantages[i, t]), float(old[i, t])
            if bool(batch.is_fixed[i]):
                x = math.exp(o) if mode == "luffy" else math.exp(o - (-0.5))
                total += -a * x / (x + c)
            else:
                total += -a
            n += 1
    assert bool(batch.is_fixed.any())
    assert m["train/pg_loss"] == pytest.approx(total / n, rel=1e-5, abs=1e-7)
