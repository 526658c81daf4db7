"""Skipping the redundant old-log-prob pass (issue 18, deliverable 2) on the trainer's real path.

With one optimizer step over the whole rollout batch the old log-probs are the training forward's own
(detached) log-probs, so `trainer.skip_old_logprob_pass=auto` drops the separate pass and scores only what
R_off needs before the update (the fixed rows + their originals). Two short real runs (tiny megatron actor,
embedded engine, RFPO with fixes in every step), pass on (`false`) vs skipped (`auto`), give the same metrics
(rel 1e-6) and the same final weights; with actor.ppo_epochs=2 the full pass is kept (pass count asserted).
Each run is a subprocess (`python tests/test_trainer_old_logp.py OUT k=v ...`) that records every
Actor.compute_logprobs call (rows scored) and the actor's final weights.
"""
from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

from test_trainer_fixtures import build_assets, tiny_overrides, trainer_env

RFPO_FIXES = {"data.reward_fn": "even_length", "rfpo.fix.trigger": "any_wrong", "rfpo.fix.max_per_group": 2,
              "trainer.save_interval": 0, "logging.wandb_mode": "disabled", "logging.console": "false"}


def _run(assets, out, **extra) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), os.path.join(out, "result.pkl"),
            *tiny_overrides(assets, out, **{**RFPO_FIXES, **extra})]
    p = subprocess.run(argv, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    with open(os.path.join(out, "result.pkl"), "rb") as fh:
        return pickle.load(fh)


def _comparable(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("perf/")}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(str(tmp_path_factory.mktemp("old_logp_assets")))


def test_skipped_pass_gives_identical_metrics_and_weights_with_rfpo_fixes(assets, tmp_path):
    full = _run(assets, str(tmp_path / "full"), **{"trainer.skip_old_logprob_pass": "false"})
    skip = _run(assets, str(tmp_path / "skip"), **{"trainer.skip_old_logprob_pass": "auto"})
    steps = len(full["metrics"])
    assert steps == 2 and len(skip["metrics"]) == steps
    # pass on: one forward per step over the N rows + F originals; skipped: only the 2F rows R_off needs
    for mf, ms, cf, cs in zip(full["metrics"], skip["metrics"], full["calls"], skip["calls"]):
        n = int(mf["rollout/num_samples"])
        f = round(mf["rfpo/fixed_seq_frac"] * n)
        assert f > 0  # fixes present in every step
        assert mf["perf/old_logprob_pass_skipped"] == 0.0 and ms["perf/old_logprob_pass_skipped"] == 1.0
        assert cf == [n + f] and cs == [2 * f]
    for mf, ms in zip(full["metrics"], skip["metrics"]):
        a, b = _comparable(mf), _comparable(ms)
        assert a.keys() == b.keys()
        for k in a:
            if k == "train/ppo_kl":  # exactly 0 when skipped; the separate pass's float noise otherwise
                assert abs(a[k]) < 1e-6 and b[k] == 0.0, (k, a[k], b[k])
            else:
                assert math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-7), (k, a[k], b[k])
    assert full["weights"].keys() == skip["weights"].keys() and full["weights"]
    for k in full["weights"]:
        torch.testing.assert_close(skip["weights"][k], full["weights"][k], rtol=1e-6, atol=1e-7, msg=k)
    assert any(not torch.equal(full["weights"][k], full["initial"][k]) for k in full["weights"])  # it trained


def test_two_ppo_epochs_keep_the_full_pass(assets, tmp_path):
    r = _run(assets, str(tmp_path / "epochs2"), **{"actor.ppo_epochs": 2, "trainer.steps": 1,
                                                   "trainer.skip_old_logprob_pass": "auto"})
    (m,), (calls,) = r["metrics"], r["calls"]
    n = int(m["rollout/num_samples"])
    f = round(m["rfpo/fixed_seq_frac"] * n)
    assert m["perf/old_logprob_pass_skipped"] == 0.0 and m["train/optimizer_steps"] == 2.0
    assert calls == [n + f]  # the full pass (N rows + F originals), once


if __name__ == "__main__":  # subprocess: python tests/test_trainer_old_logp.py RESULT.pkl k=v ...
    torch.set_num_threads(1)
    from test_trainer_fixtures import register_test_reward

    register_test_reward()
    import rfpo_megatron.trainer as trainer_mod
    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.config import load_config

    result = {"metrics": [], "calls": [], "weights": {}, "initial": {}}
    real_logprobs, real_step, real_teardown = Actor.compute_logprobs, trainer_mod.train_one_step, trainer_mod.teardown

    def weights(rt):
        return {k: v.detach().float().cpu().clone() for i, m in enumerate(rt.actor.model)
                for k, v in ((f"{i}.{n}", p) for n, p in m.named_parameters())}

    def compute_logprobs(self, batch, **kw):
        result["calls"][-1].append(len(batch))
        return real_logprobs(self, batch, **kw)

    def train_one_step(rt, step):
        if not result["initial"]:
            result["initial"] = weights(rt)
        result["calls"].append([])
        m = real_step(rt, step)
        result["metrics"].append(dict(m))
        return m

    def teardown(rt):
        result["weights"] = weights(rt)
        real_teardown(rt)

    Actor.compute_logprobs = compute_logprobs
    trainer_mod.train_one_step, trainer_mod.teardown = train_one_step, teardown
    trainer_mod.train(load_config(None, sys.argv[2:]))
    with open(sys.argv[1], "wb") as fh:
        pickle.dump(result, fh)
