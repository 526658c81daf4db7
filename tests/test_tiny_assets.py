"""Tiny CPU example assets: char tokenizer round trip + chat template, Qwen2 config, prepare.py (slow)."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_cpu")
sys.path.insert(0, HERE)


def test_tokenizer_roundtrip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    from tiny_assets import VOCAB_SIZE, build_tokenizer

    build_tokenizer(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "347+285|7+5+0=12 ans=632|ref:x y\nz"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text  # one token per character
    assert len({tok.convert_tokens_to_ids(str(d)) for d in range(10)}) == 10
    chat = tok.apply_chat_template([{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "ans=3"}],
                                   tokenize=False)
    assert chat == "<|user|>1+2<|assistant|>ans=3<|end|>"
    assert tok.eos_token == "<|end|>" and tok.pad_token_id == 0 and len(tok) <= VOCAB_SIZE


def test_tokenizer_same_ids_next_to_a_qwen2_config(tmp_path):
    """In a model dir (config.json model_type=qwen2) AutoTokenizer picks Qwen2Tokenizer: same ids."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from tiny_assets import build_tokenizer, tiny_qwen2_config

    tok = build_tokenizer(str(tmp_path / "tok"))
    Qwen2ForCausalLM(tiny_qwen2_config(tok, hidden=32, layers=1, heads=2, kv_heads=1)).save_pretrained(
        str(tmp_path / "model"))
    tok.save_pretrained(str(tmp_path / "model"))
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    text = "<|user|>12+3 x\ny<|assistant|>2+3+0=5 1+0+0=1 ans=15<|end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok2(text, add_special_tokens=False)["input_ids"] == ids
    assert tok2.decode(ids) == text and tok2.eos_token_id == tok.eos_token_id
    assert tok2.apply_chat_template([{"role": "user", "content": "1 2"}], tokenize=False,
                                    add_generation_prompt=True) == "<|user|>1 2<|assistant|>"


def test_tiny_qwen2_forward(tmp_path):
    import torch
    from transformers import Qwen2ForCausalLM

    from tiny_assets import build_tokenizer, tiny_qwen2_config

    tok = build_tokenizer(str(tmp_path))
    cfg = tiny_qwen2_config(tok)
    assert cfg.model_type == "qwen2" and cfg.num_key_value_heads < cfg.num_attention_heads
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg).eval()
    assert 3e5 < sum(p.numel() for p in m.parameters()) < 2e6
    x = torch.tensor([tok("12+3", add_special_tokens=False)["input_ids"]])
    assert m(input_ids=x).logits.shape == (1, 4, cfg.vocab_size)


def test_sft_fix_examples_are_fix_prompts(tmp_path):
    import random

    from rfpo_megatron.rewards.addition import AdditionVerifier, make_problem
    from tiny_assets import build_tokenizer
    from warmstart import corrupt_solution, sft_examples

    tok = build_tokenizer(str(tmp_path))
    rng = random.Random(0)
    recs = [make_problem(rng, 2) for _ in range(40)]
    for r in recs:  # corruptions are wrong, and the verifier says so
        assert AdditionVerifier().score(corrupt_solution(r, rng), r["answer"], r).reward == 0.0
    ex = sft_examples(recs, tok, {"reference": "{prompt}|{response}|ref:{solution}|fix:"}, 1.0, ["reference"])
    assert len(ex) == 80
    plain, fix = ex[0], ex[1]
    assert tok.decode(plain[0]) == f"<|user|>{recs[0]['prompt']}<|assistant|>"
    assert tok.decode(plain[1]) == recs[0]["solution"] + "<|end|>" and fix[1] == plain[1]
    assert f"|ref:{recs[0]['solution']}|fix:" in tok.decode(fix[0])


def _gated(gate_at, n, **kw):
    """Drive warmstart.GatedSchedule for up to n steps, calling start_decay() after step `gate_at`;
    returns (schedule, lr after each step)."""
    import torch

    from warmstart import GatedSchedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, lrs = GatedSchedule(opt, **kw), []
    for t in range(1, n + 1):
        if sched.done:
            break
        sched.step()
        if t == gate_at:
            sched.start_decay()
        lrs.append(opt.param_groups[0]["lr"])
    return sched, lrs


def test_gated_schedule_holds_the_lr_until_the_gate():
    """Hand-worked: warm-up (t+1)/10, constant until the gate after step 249, then 0.5 (1 + cos(pi j / 100))."""
    import math

    sched, lrs = _gated(249, 2000, lr=3e-3, max_steps=5000, decay=100, warmup=10)
    assert sched.gated_at == 249 and sched.decay_from == 249 and len(lrs) == 349 and sched.done
    assert lrs[0] == pytest.approx(3e-3 * 2 / 10) and lrs[8] == pytest.approx(3e-3)
    assert all(x == pytest.approx(3e-3) for x in lrs[9:248])  # held until the gate
    for j in (1, 25, 50, 99, 100):  # step 249 + j
        assert lrs[248 + j] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * j / 100)), abs=1e-12)


def test_gated_schedule_decays_at_the_cap_when_the_gate_is_never_met():
    sched, lrs = _gated(None, 5000, lr=1e-3, max_steps=1000, decay=200, warmup=10)
    assert sched.gated_at is None and sched.decay_from == 800 and len(lrs) == 1000 and lrs[-1] == pytest.approx(0)
    assert lrs[798] == pytest.approx(1e-3) and lrs[899] == pytest.approx(0.5e-3)


def test_gated_schedule_hold_cap_then_reheat():
    """Hand-worked: a phase that never meets its gate decays after `hold` steps; reheat(0.5) warms up to half
    the lr from the next step ((t - phase_start + 1) / warmup), holds, and decays again."""
    import math

    import torch

    from warmstart import GatedSchedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s, lrs = GatedSchedule(opt, 1e-3, max_steps=10_000, decay=20, warmup=10, hold=50), []
    while not s.done:
        s.step()
        if s.decay_from is None and s.t - s.phase_start >= s.hold:  # what train_sft does at the hold cap
            s.start_decay(gated=False)
        lrs.append(opt.param_groups[0]["lr"])
    assert s.t == 70 and s.decay_from == 50 and s.gated_at is None and lrs[-1] == pytest.approx(0, abs=1e-15)
    s.reheat(0.5)
    assert not s.done and s.phase_start == 70
    s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3 * 2 / 10)
    for _ in range(9):
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    s.start_decay()
    assert s.gated_at == 80  # the first gate met, in any phase
    for _ in range(5):
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 20)))


def _tiny_sft_run(tmp_path, final_check, steps=40, probe_acc=1.0, hold=100):
    import torch
    from transformers import Qwen2ForCausalLM

    from tiny_assets import build_tokenizer, tiny_qwen2_config
    from warmstart import train_sft

    tok = build_tokenizer(str(tmp_path / "tok"))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(tok, hidden=16, layers=1, heads=2, kv_heads=1))
    g = torch.Generator().manual_seed(1)
    examples = [(torch.randint(5, 40, (4,), generator=g).tolist(), torch.randint(5, 40, (3,), generator=g).tolist())
                for _ in range(16)]

    def probe(m):  # consumes torch's RNG: train_sft must restore it
        torch.rand(3)
        return probe_acc

    rng = torch.get_rng_state()
    res = train_sft(model, examples, steps, batch_size=4, lr=1e-2, seed=0, log=lambda _: None, probe=probe,
                    gate=0.5, probe_every=2, decay=3, hold=hold, final_check=final_check, reheat=0.5)
    assert torch.equal(torch.get_rng_state(), rng)  # probes and checks leave torch's RNG as they found it
    return res, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_train_sft_reheats_until_the_final_check_passes(tmp_path):
    """A failing final check reheats (the gate is met at the phase's first probe, then 3 decay steps); a
    passing one ends the run
    with weights identical to a run without the check (the check runs in eval mode, RNG restored)."""
    import torch

    calls = []

    def check(m):
        calls.append(m.training)
        torch.rand(5)
        return len(calls) >= 3, {"n": len(calls)}

    res, _ = _tiny_sft_run(tmp_path, check)
    assert [c[:2] for c in res["checks"]] == [(5, False), (9, False), (13, True)] and res["reheats"] == 2
    assert len(res["losses"]) == 13 and calls == [False, False, False] and res["gated_at"] == 2
    res_pass, w_pass = _tiny_sft_run(tmp_path, lambda m: (torch.rand(2) is not None, {}))
    res_none, w_none = _tiny_sft_run(tmp_path, None)
    assert len(res_pass["losses"]) == len(res_none["losses"]) == 5 and res_pass["reheats"] == 0
    assert torch.equal(w_pass, w_none)
    res_cap, _ = _tiny_sft_run(tmp_path, lambda m: (False, {}), steps=12)  # 12 - 9 < 2 + 3: no third phase
    assert [c[0] for c in res_cap["checks"]] == [5, 9] and res_cap["reheats"] == 1 and len(res_cap["losses"]) == 9
    res_hold, _ = _tiny_sft_run(tmp_path, lambda m: (True, {}), probe_acc=0.0, hold=4)  # gate never met
    assert res_hold["gated_at"] is None and [p[0] for p in res_hold["probes"]] == [2, 4]
    assert [c[:2] for c in res_hold["checks"]] == [(7, True)] and len(res_hold["losses"]) == 7  # 4 held + 3 decay


def test_sft_restart_is_the_run_a_fresh_init_seed_makes(tmp_path):
    """A run whose final check fails at the cap restarts from init seed + 1000; the restarted attempt ends
    with the same weights as a run started with that init seed directly (what --init-seed 1004 reproduces)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from tiny_assets import build_tokenizer, tiny_qwen2_config
    from warmstart import sft_with_restarts, train_sft

    tok = build_tokenizer(str(tmp_path / "tok"))
    g = torch.Generator().manual_seed(1)
    examples = [(torch.randint(5, 40, (4,), generator=g).tolist(), torch.randint(5, 40, (3,), generator=g).tolist())
                for _ in range(16)]

    def make(seed):
        torch.manual_seed(seed)
        m = Qwen2ForCausalLM(tiny_qwen2_config(tok, hidden=16, layers=1, heads=2, kv_heads=1))
        m.init_seed = seed
        return m

    kw = dict(examples=examples, steps=8, batch_size=4, lr=1e-2, probe=lambda m: 1.0, gate=0.5, probe_every=2,
              decay=3, hold=100, reheat=0.5)
    logs = []
    model, res, attempts = sft_with_restarts(make, 4, 2, logs.append,
                                             final_check=lambda m: (m.init_seed == 1004, {}), **kw)
    assert [a["init_seed"] for a in attempts] == [4, 1004] and attempts[0]["checks"][-1][1] is False
    assert any("restarting from a fresh init (init seed 1004)" in x for x in logs)
    direct = make(1004)
    train_sft(direct, seed=1004, log=lambda _: None, final_check=lambda m: (True, {}), **kw)
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert torch.equal(flat(model), flat(direct))
    _, _, never = sft_with_restarts(make, 0, 1, logs.append, final_check=lambda m: (False, {}), **kw)
    assert [a["init_seed"] for a in never] == [0, 1000] and "no restart is left" in logs[-1]


def test_check_band_names_what_is_outside():
    from warmstart import check_band

    band = {"metrics": {"easy_acc_greedy": {"mean": 0.98, "band": [0.95, 1.0]},
                        "fix_on_hard.reference.fix_success_rate": {"mean": 0.9, "band": [0.8, 1.0]},
                        "sft.final_loss": {"mean": 0.01, "band": [0.0, 0.02]}}}
    rep = {"easy_acc_greedy": 0.96, "fix_on_hard": {"reference": {"fix_success_rate": 0.5}}, "sft": {"final_loss": 0.08}}
    lines, outside = check_band(rep, band)
    assert outside == ["reference fix success", "final SFT loss"] and len(lines) == 4
    assert "ok" in lines[1] and "OUTSIDE" in lines[2]
    assert check_band({**rep, "fix_on_hard": {"reference": {"fix_success_rate": 0.85}}, "sft": {"final_loss": 0.01}},
                      band)[1] == []


@pytest.mark.slow
def test_prepare_end_to_end(tmp_path):
    out = tmp_path / "art"
    cmd = [sys.executable, os.path.join(HERE, "prepare.py"), "--out", str(out), "--sft-steps", "30",
           "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    for d in ("tokenizer", "data", "model"):
        assert (out / d / "DONE.json").exists()
    rep = json.loads((out / "warmstart_report.json").read_text())
    assert set(rep["fix_on_hard"]) == {"rewrite", "reward", "error_info", "reference"}
    import torch
    assert rep["machine"] == {"threads": 1, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "torch": torch.__version__}  # same env as this process: same kernel path
    assert "warm start (1 thread(s), " + torch.backends.cpu.get_cpu_capability() + " kernels)" in r.stdout
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # idempotent: nothing rebuilt
    assert r2.returncode == 0 and "exists" in r2.stdout and "warm-start SFT" not in r2.stdout


def test_hf_generate_fn_logprobs_match_a_forward_pass(tmp_path):
    """The HF-generate engine callable: n samples per prompt, ids end at EOS or the length limit,
    reported log-probs equal log_softmax of a separate full forward pass (T = 1)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from rfpo_megatron.data.template import encode_prompt
    from tiny_assets import build_tokenizer, tiny_qwen2_config
    from warmstart import hf_generate_fn

    tok = build_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(tiny_qwen2_config(tok, hidden=32, layers=1, heads=2, kv_heads=1)).eval()
    gen = hf_generate_fn(m, tok, max_new_tokens=6)
    prompts = [encode_prompt(tok, "12+3"), encode_prompt(tok, "1+1")]
    out = gen(prompts, 2, {"temperature": 1.0, "seed": 3})
    assert [len(o) for o in out] == [2, 2]
    for p, group in zip(prompts, out):
        for ids, lps, fin in group:
            assert len(ids) == len(lps) and 1 <= len(ids) <= 6
            assert fin == ("stop" if ids[-1] == tok.eos_token_id else "length")
            with torch.no_grad():
                logits = m(input_ids=torch.tensor([p + ids])).logits[0].double()
            ref = torch.log_softmax(logits, -1)[len(p) - 1:-1].gather(-1, torch.tensor(ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(lps, dtype=torch.float64), ref, atol=1e-4)
    assert gen(prompts, 2, {"temperature": 1.0, "seed": 3}) == out  # seeded


@pytest.mark.slow
@pytest.mark.timeout(3600)  # pytest.ini's 900 s is less than a loaded box needs (16-28 min measured 2026-12-02)
def test_warm_start_falls_inside_the_documented_band(tmp_path):
    """The demo's warm start (examples/tiny_cpu/prepare.py with its default recipe, seed 0, 1 thread; ≈ 10-20 min)
    lands inside examples/tiny_cpu/warmstart_band.json: easy/hard accuracy, reference fix success and the final
    SFT loss (a run whose SFT stalls before the loss jump ends near 0.08 and fails here)."""
    from warmstart import check_band

    with open(os.path.join(HERE, "warmstart_band.json")) as f:
        band = json.load(f)
    out = tmp_path / "art"
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), "--out", str(out), "--seed", "0",
                        "--threads", "1"], capture_output=True, text=True, timeout=3600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the band does not apply" not in r.stdout  # prepare.py's defaults are the band's recipe
    rep = json.loads((out / "warmstart_report.json").read_text())
    lines, outside = check_band(rep, band)
    assert not outside, "\n".join(lines)
    assert "warm start inside the documented band" in r.stdout
