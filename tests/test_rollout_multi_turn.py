"""rollout.generate_fn and the built-in multi-turn rollout, on the real embedded server over loopback.

Dialogues are checked token for token against a hand-built replay (raw greedy engine calls + the tiny chat
template's markup written out by hand); the trainer's own loss mask (build_batch -> make_step -> ActorBatch) is
0 on every environment token and a real megatron actor's gradient does not move when everything at environment
positions is changed; the fix stage fixes the final turn and R_off equals a reference computed on the plain
dialogue prefix; bad functions give one-line errors; a 3-step trainer run with RFPO on places multi-turn fixes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from test_trainer_fixtures import ROOT, build_assets, run_trainer_cmd, tiny_overrides, trainer_env

from rfpo_megatron import train as T
from rfpo_megatron.actor.batch import ActorBatch, pad_tokens
from rfpo_megatron.config import ConfigError, load_config
from rfpo_megatron.data.template import PromptFormat, encode_prompt, env_turn_text
from rfpo_megatron.rollout import SamplingParams, launch_engine
from rfpo_megatron.train.custom_rollout import GenerateFnError, run_generate_fn, validate_generate_fn
from rfpo_megatron.train.rollout_fn import RolloutContext, load_callable

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")
ENV_FILE = """
SEEN = []


def env(record, turns):
    SEEN.append((record["id"], list(turns)))
    return "no"
"""


class ScriptedVerifier:
    """Callable verifier: a fixed verdict (`ok`), recording every text it scored."""

    def __init__(self, ok=False, message="carry"):
        self.ok, self.message, self.seen = ok, message, []

    def __call__(self, text, answer, record):
        self.seen.append(text)
        return (1.0, "") if self.ok else (0.0, self.message)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("multi_turn")
    assets = build_assets(str(root / "assets"))
    (root / "user_env.py").write_text(ENV_FILE)
    engine = launch_engine({"backend": "embedded", "model_path": assets["model"], "log_dir": str(root / "logs")})
    tok = AutoTokenizer.from_pretrained(assets["model"])
    with open(assets["train"]) as fh:
        records = [json.loads(line) for line in fh][:2]
    yield {"root": root, "assets": assets, "engine": engine, "tok": tok, "records": records,
           "env_spec": f"{root / 'user_env.py'}:env"}
    engine.shutdown()


def make_rt(env, verifier, **kv):
    cfg = load_config(None, tiny_overrides(env["assets"], str(env["root"] / "out"), **kv))
    return T.Runtime(cfg, engine=env["engine"], tokenizer=env["tok"], prompt_format=PromptFormat(mode="auto"),
                     verifier=verifier, eos_ids=[env["tok"].eos_token_id])


def greedy(env, ids):
    p = SamplingParams(n=1, temperature=0.0, max_new_tokens=8, stop_token_ids=[env["tok"].eos_token_id])
    return env["engine"].generate([list(ids)], p)[0][0]


def enc(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def dialogues(env):
    """Greedy 3-turn dialogues with the user env file (always replies "no"): (rt, groups, verifier)."""
    ver = ScriptedVerifier(ok=False)
    rt = make_rt(env, ver, **{"rollout.generate_fn": "multi_turn", "rollout.temperature": 0.0, "rollout.n_samples": 2,
                              "rollout.generate_kwargs": "{max_turns: 3, env_fn: '%s'}" % env["env_spec"]})
    return rt, T.rollout(rt, env["records"], seed=1), ver


def test_env_turn_text_follows_the_chat_template(env):
    tok = env["tok"]
    fmt = PromptFormat(mode="auto")
    assert env_turn_text(tok, "wrong", fmt, "<|end|>") == "<|user|>wrong<|assistant|>"  # the stop token closed it
    assert env_turn_text(tok, "wrong", fmt, "") == "<|end|><|user|>wrong<|assistant|>"  # ran out of tokens
    assert env_turn_text(tok, "wrong", PromptFormat(mode="plain"), "<|end|>") == "\nwrong\n"
    qwen = copy.deepcopy(tok)
    qwen.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert env_turn_text(qwen, "wrong", fmt, "<|im_end|>") == "\n<|im_start|>user\nwrong<|im_end|>\n<|im_start|>assistant\n"
    assert env_turn_text(qwen, "wrong", fmt, "") == "<|im_end|>\n<|im_start|>user\nwrong<|im_end|>\n<|im_start|>assistant\n"


def test_dialogues_equal_a_hand_built_replay(env, dialogues):
    rt, groups, ver = dialogues
    tok = env["tok"]
    assert [g.record["id"] for g in groups] == [r["id"] for r in env["records"]]
    finals = []
    for rec, g in zip(env["records"], groups):
        q = encode_prompt(tok, rec["prompt"], PromptFormat(mode="auto"))
        ids, mask, logps, turns = [], [], [], []
        for t in range(3):
            out = greedy(env, q + ids)
            ids, mask, logps = ids + out.output_ids, mask + [1] * len(out.output_ids), logps + out.logprobs
            turns.append(out.output_ids)
            if t < 2:  # the tiny template's markup, by hand: close the turn unless <|end|> did, user turn, prompt
                e = enc(tok, ("" if out.finish_reason == "stop" else "<|end|>") + "<|user|>no<|assistant|>")
                ids, mask, logps = ids + e, mask + [0] * len(e), logps + [0.0] * len(e)
        assert len(g.samples) == 2
        for s in g.samples:
            assert s.prompt_ids == q and s.response_ids == ids and s.loss_mask == mask
            assert s.rollout_logprobs == pytest.approx(logps, abs=1e-4)
            assert s.final_turn_start == len(ids) - len(turns[-1])
            assert s.response_text == tok.decode(turns[-1], skip_special_tokens=True)
            assert s.reward == 0.0 and s.reward_message == "carry"
        finals += [tok.decode(turns[-1], skip_special_tokens=True)] * 2
    assert ver.seen == finals  # the verifier scored exactly the final turns
    seen = sys.modules[load_callable(env["env_spec"], "x").__module__].SEEN
    assert len(seen) == 4 * 2 and all(len(turns) in (1, 2) for _, turns in seen)  # asked after turns 1 and 2
    assert rt.counters["generated_tokens"] == sum(sum(s.loss_mask) for g in groups for s in g.samples)


def test_default_environment_is_the_verifier(env):
    tok = env["tok"]
    kw = {"rollout.generate_fn": "multi_turn", "rollout.n_samples": 2,
          "rollout.generate_kwargs": "{max_turns: 3, feedback_template: 'hint: {message}'}"}
    groups = T.rollout(make_rt(env, ScriptedVerifier(ok=False, message="carry"), **kw), env["records"], seed=2)
    for s in (s for g in groups for s in g.samples):
        runs, cur = [], [s.loss_mask[0], []]
        for t, m in zip(s.response_ids, s.loss_mask):
            if m != cur[0]:
                runs.append(cur)
                cur = [m, []]
            cur[1].append(t)
        runs.append(cur)
        env_texts = [tok.decode(ids) for m, ids in runs if not m]
        assert [m for m, _ in runs] == [1, 0, 1, 0, 1] and len(env_texts) == 2
        assert all(t.removeprefix("<|end|>") == "<|user|>hint: carry<|assistant|>" for t in env_texts)
    right = T.rollout(make_rt(env, ScriptedVerifier(ok=True), **kw), env["records"], seed=2)
    for s in (s for g in right for s in g.samples):  # a correct first turn ends the dialogue
        assert all(s.loss_mask) and s.final_turn_start == 0 and s.reward == 1.0


def test_trainer_loss_mask_is_zero_on_environment_tokens(env, dialogues):
    rt, groups, _ = dialogues
    groups = copy.deepcopy(groups)
    for g in groups:
        g.samples[0].reward = 1.0  # mixed groups: nonzero GRPO advantages
    batch = T.build_batch(groups)
    old = torch.zeros_like(batch.response_mask, dtype=torch.float32)
    step = T.make_step(rt.cfg, batch, old, None, None, torch.zeros(batch.n), T.advantages(rt.cfg, batch, old, None))
    ab = step.actor_batch()
    samples = [s for g in groups for s in g.samples]
    n_env = 0
    for i, s in enumerate(samples):
        want = [bool(m) for m in s.loss_mask]
        L = len(want)
        n_env += want.count(False)
        assert step.loss_mask[i, :L].tolist() == want and not step.loss_mask[i, L:].any()
        assert ab.mask_of(i).tolist() == want
        env_pos = torch.tensor([not m for m in want])
        assert (step.advantages[i, :L][env_pos] == 0).all() and (step.advantages[i, :L][~env_pos] != 0).all()
    assert n_env > 0


@pytest.fixture(scope="module")
def grad_actor():
    from grad_actor import grad_recording_actor

    yield from grad_recording_actor(micro_batch_size=8)


def test_environment_tokens_get_no_gradient(env, dialogues, grad_actor):
    """A real megatron actor's reduced gradients are unchanged when the advantage and old log-prob of every
    environment token are replaced by random values, and change when one model token's advantage does."""
    rt, groups, _ = dialogues
    groups = copy.deepcopy(groups)
    for g in groups:
        g.samples[0].reward = 1.0
        for s in g.samples:  # the grad actor's vocabulary is 61
            s.prompt_ids = [t % 61 for t in s.prompt_ids]
            s.response_ids = [t % 61 for t in s.response_ids]
    batch = T.build_batch(groups)
    logp, _ = grad_actor.compute_logprobs(ActorBatch.from_prompt_response(batch.prompt_ids, batch.response_ids))
    old = torch.nn.functional.pad(pad_tokens(logp), (0, batch.response_mask.shape[1] - max(map(len, logp))))
    step = T.make_step(rt.cfg, batch, old, None, None, torch.zeros(batch.n), T.advantages(rt.cfg, batch, old, None))
    base = step.actor_batch()
    gen = torch.Generator().manual_seed(0)

    def perturbed(where):
        adv, olp = [a.clone() for a in base.advantages], [o.clone() for o in base.old_logp]
        for i in range(len(adv)):
            sel = where(i)
            adv[i][sel] = torch.randn(int(sel.sum()), generator=gen) * 5
            olp[i][sel] = -torch.rand(int(sel.sum()), generator=gen) * 5
        return dataclasses.replace(base, advantages=adv, old_logp=olp)

    env_pos = [torch.tensor([not m for m in s.loss_mask]) for g in groups for s in g.samples]  # from the rollout
    assert sum(int(e.sum()) for e in env_pos) > 0
    grads = []
    for b in (base, perturbed(lambda i: env_pos[i]),
              perturbed(lambda i: torch.arange(len(env_pos[i])) == int((~env_pos[i]).nonzero()[0]))):
        grad_actor._grads.clear()
        grad_actor.train_step(b, rt.cfg.algo, None)
        grads.append(torch.cat([g.flatten() for g in grad_actor._grads[-1]]))
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])  # environment tokens: no gradient at all
    assert not torch.allclose(grads[0], grads[2])  # control: a model token's advantage moves it


class HFActor:
    """compute_logprobs with the HF model (the reference forward for R_off; float64)."""

    def __init__(self, path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64).eval()

    def logp(self, prompt, response):
        ids = torch.tensor([list(prompt) + list(response)])
        with torch.no_grad():
            lp = torch.log_softmax(self.model(ids).logits[0, :-1].double(), -1)
        return lp[len(prompt) - 1:, :].gather(-1, ids[0, len(prompt):, None])[:, 0]

    def compute_logprobs(self, batch, **kw):
        return [self.logp(x[:p].tolist(), x[p:].tolist()).float() for x, p in zip(batch.input_ids, batch.prompt_lens)], None


def test_fix_stage_fixes_the_final_turn_and_roff_uses_the_plain_dialogue_prefix(env):
    from rfpo_megatron.fix.templates import render_fix_prompt, resolve_templates

    tok = env["tok"]
    ver = ScriptedVerifier(ok=False, message="carry")
    rt = make_rt(env, ver, **{"rollout.generate_fn": "multi_turn", "rollout.temperature": 0.0, "rollout.n_samples": 2,
                              "rollout.generate_kwargs": "{max_turns: 2}", "rfpo.fix.max_per_group": 2,
                              "rfpo.roff_mode": "seq_sum", "rfpo.roff_clip": 29.0, "rfpo.gamma": 0.7,
                              "rfpo.fix.temperature": 1.0})
    groups = T.rollout(rt, env["records"], seed=3)
    originals = [copy.deepcopy(s) for g in groups for s in g.samples]
    ver.ok = True  # every fix passes
    groups, m = T.fix_stage(rt, groups, seed=4)
    assert m["rfpo/fix_targets"] == 4 and m["rfpo/fixed_seq_frac"] == 1.0
    fixed = [s for g in groups for s in g.samples]
    hf = HFActor(env["assets"]["model"])
    fix_prompts = []
    for o, f in zip(originals, fixed):
        k0 = o.final_turn_start
        assert 0 < k0 < len(o.response_ids)
        prefix = o.prompt_ids + o.response_ids[:k0]  # q a_1 e_1: no fix feedback
        assert f.is_fixed and f.prompt_ids == prefix and f.fixed_from == o.response_ids[k0:]
        assert f.loss_mask is None and not f.use_tis
        text = render_fix_prompt(resolve_templates()["reference"], o.record, o.response_text, "carry")
        close = "" if o.finish_reason == "stop" else "<|end|>"
        fix_prompt = o.prompt_ids + o.response_ids + enc(tok, close + "<|user|>" + text + "<|assistant|>")
        fix_prompts.append(fix_prompt)
    replay = env["engine"].generate(fix_prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=8, seed=4,
                                                                stop_token_ids=[tok.eos_token_id]))
    assert [f.response_ids for f in fixed] == [r[0].output_ids for r in replay]  # the engine got those fix prompts
    assert any(f.response_ids != f.fixed_from for f in fixed)
    batch = T.build_batch(groups)
    old, orig = T.logprob_pass(hf, batch)
    log_roff = T.compute_roff(rt.cfg, batch, old, orig)
    ref = torch.tensor([0.7 * float(hf.logp(f.prompt_ids, f.fixed_from).sum() - hf.logp(f.prompt_ids, f.response_ids).sum())
                        for f in fixed])
    assert log_roff.double() == pytest.approx(ref.tolist(), abs=1e-4)
    on_q = torch.tensor([0.7 * float(hf.logp(o.prompt_ids, f.fixed_from).sum() - hf.logp(o.prompt_ids, f.response_ids).sum())
                         for o, f in zip(originals, fixed)])
    assert (on_q - ref).abs().max() > 1e-2  # control: the dialogue prefix matters


def _gen_file(tmp_path, body, name="gen.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return str(p)


def test_bad_generate_functions_give_one_line_errors(tmp_path):
    from rfpo_megatron.train.custom_rollout import load_generate_fn

    cases = [
        (f"{tmp_path}/nope.py:gen", "file '" + f"{tmp_path}/nope.py" + "' not found"),
        (_gen_file(tmp_path, "def other(engine, records, params, ctx): pass\n") + ":gen", "has no 'gen' (callables there: other)"),
        (_gen_file(tmp_path, "def gen(engine, records): pass\n", "sig.py") + ":gen",
         "must accept (engine, records, params, ctx)"),
        (_gen_file(tmp_path, "import no_such_module_xyz\n", "imp.py") + ":gen", "importing"),
        ("no_such_module_xyz:gen", "cannot import module 'no_such_module_xyz'"),
    ]
    for spec, needle in cases:
        with pytest.raises(GenerateFnError) as e:
            load_generate_fn(spec)
        msg = str(e.value)
        assert needle in msg and f"rollout.generate_fn '{spec}'" in msg and "\n" not in msg, msg
    records = [{"id": "a", "prompt": "1+1"}, {"id": "b", "prompt": "2+2"}]
    ctx = RolloutContext(tokenizer=None)
    from rfpo_megatron.data.types import RolloutGroup, Sample

    good = Sample(prompt_ids=[1, 2], response_ids=[3, 4])
    for out, needle in [({"a": 1}, "returned dict; return a list of rfpo_megatron.data.types.RolloutGroup"),
                        ([RolloutGroup([1], [good])], "returned 1 groups for 2 records"),
                        ([{"samples": []}, {}], "group 0 is a dict"),
                        ([RolloutGroup([1], [good]), RolloutGroup([1], [])], "group 1 has no samples"),
                        ([RolloutGroup([1], [good]), RolloutGroup([1], [Sample([1], [2, 3], loss_mask=[1])])],
                         "group 1 sample 0: loss_mask has 1 entries for 2 response tokens")]:
        with pytest.raises(GenerateFnError, match="rollout.generate_fn 'user:gen'") as e:
            run_generate_fn(lambda engine, records, params, ctx, out=out: out, "user:gen", None, records, None, ctx)
        assert needle in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="'rollout.generate_fn': 'nocolon' is neither a built-in"):
        load_config(None, ["rollout.generate_fn=nocolon"])
    with pytest.raises(ConfigError, match="rollout.generate_kwargs.max_turn' is unknown"):
        validate_generate_fn("multi_turn", {"max_turn": 2})
    with pytest.raises(ConfigError, match="rollout.generate_kwargs.max_turns': 0 must be an integer >= 1"):
        validate_generate_fn("multi_turn", {"max_turns": 0})
    with pytest.raises(ConfigError, match="rollout.generate_kwargs' is set but rollout.generate_fn is null"):
        validate_generate_fn(None, {"max_turns": 2})
    with pytest.raises(GenerateFnError, match="rollout.generate_kwargs.env_fn .* must accept \\(record, turns\\)"):
        validate_generate_fn("multi_turn", {"env_fn": _gen_file(tmp_path, "def env(x): pass\n", "e.py") + ":env"})


def test_trainer_cli_names_a_bad_generate_fn_in_one_line(env, tmp_path):
    p = subprocess.run(run_trainer_cmd([CONFIG, *tiny_overrides(env["assets"], str(tmp_path / "run"),
                                                                **{"rollout.generate_fn": "missing/gen.py:rollout"})]),
                       env=trainer_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith(
        "rfpo-megatron train: rollout.generate_fn 'missing/gen.py:rollout': file 'missing/gen.py' not found")


@pytest.mark.slow  # 20 s; the dialogue replay, loss mask, gradients and fix stage are tested above by default
def test_three_step_multi_turn_run_with_rfpo(env, tmp_path):
    from rfpo_megatron.logging import read_metrics

    out = str(tmp_path / "run")
    overrides = tiny_overrides(env["assets"], out, **{
        "rollout.generate_fn": "multi_turn", "rollout.generate_kwargs": "{max_turns: 2}", "rfpo.enabled": "true",
        "rfpo.fix.trigger": "any_wrong", "rfpo.fix.max_per_group": 2, "data.reward_fn": "even_length",
        "trainer.steps": 3, "trainer.save_interval": 0, "logging.wandb_mode": "disabled"})
    p = subprocess.run(run_trainer_cmd([CONFIG, *overrides]), env=trainer_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = read_metrics(os.path.join(out, "logs", "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/env_token_frac"] > 0 and 1 < r["rollout/turns_mean"] <= 2 for r in rows)
    fixed = [r for r in rows if r["rfpo/fixed_seq_frac"] > 0]
    assert fixed and any(r["rfpo/log_roff_mean"] != 0.0 for r in fixed)  # fixes placed, R_off computed
    assert all(r["train/optimizer_steps"] == 1 for r in rows)


def test_example_generate_and_reward_files_work(env):
    """examples/custom_reward: the config's user generate_fn on the real server (the reminder turn is masked) and
    the user reward file's messages (hand-checked)."""
    from rfpo_megatron.rewards import score_many

    ex = load_config(os.path.join(ROOT, "examples", "custom_reward", "config.yaml"))
    spec = os.path.join(ROOT, ex.rollout.generate_fn)
    rt = make_rt(env, ScriptedVerifier(ok=False), **{"rollout.generate_fn": spec, "rollout.n_samples": 4,
                                                    "rollout.generate_kwargs": json.dumps(ex.rollout.generate_kwargs)})
    groups = T.rollout(rt, env["records"], seed=5)
    tok, retried = env["tok"], 0
    for s in (s for g in groups for s in g.samples):
        first = s.response_ids[:s.loss_mask.index(0)] if 0 in s.loss_mask else s.response_ids
        if "ans=" in tok.decode(first, skip_special_tokens=True):
            assert all(s.loss_mask)
            continue
        retried += 1
        env_ids = [t for t, m in zip(s.response_ids, s.loss_mask) if not m]
        assert tok.decode(env_ids).removeprefix("<|end|>") == "<|user|>End with ans=<number>.<|assistant|>"
        assert s.response_text == tok.decode(s.response_ids[s.final_turn_start:], skip_special_tokens=True)
    assert retried > 0  # the random tiny model never writes ans=
    user = load_callable(os.path.join(ROOT, "examples", "custom_reward", "reward.py") + ":score", "data.reward_fn")
    rec = {"a": 17, "b": 5}
    got = [(r.reward, r.message) for r in score_many(user, [("7+5+0=12 1+0+1=2 ans=22", "22", rec),
                                                            ("7+5+0=11 ans=11", "22", rec), ("22", "22", rec),
                                                            ("7+5+0=12 1+0+1=2 ans=21", "22", rec)])]
    assert got == [(1.0, ""), (0.0, "column step 1 (7+5+0=11) does not add up"),
                   (0.0, "no final answer: end with ans=<number>"),
                   (0.0, "the column steps are right but ans= does not follow from them")]


def test_docs_example_is_the_example_file():
    doc = open(os.path.join(ROOT, "docs", "data_and_rewards.md")).read()
    code = open(os.path.join(ROOT, "examples", "custom_reward", "generate.py")).read()
    body = code[code.index("def generate("):].rstrip()
    assert body in doc
