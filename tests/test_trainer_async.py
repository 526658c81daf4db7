"""trainer.async_mode with real processes: the trainer (slow actor: RFPO_TEST_TRAIN_SLEEP_S) and the embedded
engine in its own process (slow engine: RFPO_EMBEDDED_DECODE_SLEEP_S). What every trained step held comes from
the trainer's own log of the samples it trained on (RFPO_TEST_TRAINED_LOG, tests/test_trainer_fixtures.py):
the weight versions bound the staleness, and prompt ids over a SIGTERM + resume are neither lost nor repeated
(compared with the data sampler's own order)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_trainer_fixtures import ROOT, build_assets, run_trainer_cmd, tiny_overrides, trainer_env

CONFIG = os.path.join(ROOT, "examples", "tiny_cpu", "config.yaml")
EXTRA = {"data.reward_fn": "first_char_digit", "data.prompts_per_step": 4, "rollout.n_samples": 4,
         "rfpo.fix.attempts": 1, "rfpo.fix.max_per_group": 1, "rollout.colocate": "false",
         "trainer.save_interval": 0}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(str(tmp_path_factory.mktemp("async_assets")))


def _cmd(assets, out, *flags, **kv):
    return run_trainer_cmd([CONFIG, *tiny_overrides(assets, out, **{**EXTRA, **kv}), *flags])


def _env(out, decode_sleep, train_sleep):
    return {**trainer_env(), "RFPO_EMBEDDED_DECODE_SLEEP_S": str(decode_sleep),
            "RFPO_TEST_TRAIN_SLEEP_S": str(train_sleep), "RFPO_TEST_TRAINED_LOG": os.path.join(out, "trained.jsonl")}


def _trained(out):
    with open(os.path.join(out, "trained.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _metrics(out):
    from rfpo_megatron.logging import read_metrics

    return {r["step"]: r for r in read_metrics(os.path.join(out, "logs", "metrics.jsonl"))}


def _check_staleness(records, metrics, bound):
    """Every trained sample of step k started from a version in [k - 1 - bound, k - 1]; its tokens' versions
    rise from there and never pass k - 1; the logged staleness metrics are those of the samples."""
    worst, partial = 0, 0
    for rec in records:
        k = rec["step"]
        lags = []
        for version, tokens, _fixed in rec["samples"]:
            assert k - 1 - bound <= version <= k - 1, (k, version)
            if tokens is not None:
                assert min(tokens) == version and max(tokens) <= k - 1 and tokens == sorted(tokens), (k, tokens)
                partial += len(set(tokens)) > 1
            lags.append(k - 1 - version)
        worst = max(worst, max(lags))
        m = metrics[k]
        assert m["rollout/staleness_max"] == max(lags)
        assert m["rollout/staleness_mean"] == pytest.approx(sum(lags) / len(lags))
    return worst, partial


def _sampler_order(n_steps, per_step, seed, train_file):
    """The prompt ids the data sampler hands out over n_steps (its own code, run here)."""
    from rfpo_megatron.data.sampler import PromptSampler

    with open(train_file) as fh:
        ids = [json.loads(line)["id"] for line in fh]
    s = PromptSampler(len(ids), per_step, seed=seed, shuffle=True)
    return [[ids[i] for i in s.next_indices()] for _ in range(n_steps)]


def test_config_refuses_async_when_colocated_and_reads_yaml_off():
    from rfpo_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="trainer.async_mode.*rollout.colocate=false"):
        load_config(CONFIG, ["trainer.async_mode=one_step", "rollout.colocate=true"])
    with pytest.raises(ConfigError, match="trainer.max_staleness"):
        load_config(CONFIG, ["trainer.async_mode=one_step", "rollout.colocate=false", "trainer.max_staleness=2"])
    assert load_config(CONFIG, ["trainer.async_mode=off"]).trainer.async_mode == "off"  # YAML's `off` is false
    assert load_config(CONFIG, ["trainer.async_mode=bounded", "rollout.colocate=false",
                                "trainer.max_staleness=3"]).trainer.max_staleness == 3


def test_one_step_never_trains_on_data_older_than_one_step(assets, tmp_path):
    """The default-lane run (about 20 s): 3 one_step steps; steps 2 and 3 train on one-version-old data."""
    out = str(tmp_path)
    p = subprocess.run(_cmd(assets, out, **{"trainer.async_mode": "one_step", "trainer.steps": 3}),
                       env=_env(out, decode_sleep=0.05, train_sleep=0.3), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    records = _trained(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    worst, _ = _check_staleness(records, _metrics(out), bound=1)
    assert worst == 1
    assert [r["prompts"] for r in records] == _sampler_order(3, 4, seed=3, train_file=assets["train"])


@pytest.mark.slow
def test_one_step_sigterm_in_flight_then_resume_loses_and_repeats_no_prompt(assets, tmp_path):
    """one_step with a rollout slower than the update: every step after the first trains on data one version
    old, syncs land mid-generation (resumed samples with two versions), and a SIGTERM while the next steps
    are being generated leaves a checkpoint from which --resume trains exactly the sampler's next prompts."""
    out = str(tmp_path)
    env = _env(out, decode_sleep=0.15, train_sleep=0.5)
    proc = subprocess.Popen(_cmd(assets, out, **{"trainer.async_mode": "one_step", "trainer.steps": 200}),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_path, deadline = os.path.join(out, "logs", "metrics.jsonl"), time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics_path) and sum(1 for _ in open(metrics_path)) >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)  # the producer is generating the next step(s) now
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM" in stdout
    with open(os.path.join(out, "ckpt", "latest")) as fh:
        ckpt = int(fh.read().strip().split("_")[1])
    first = _trained(out)
    assert [r["step"] for r in first] == list(range(1, ckpt + 1))  # every trained step is in the checkpoint
    worst, partial = _check_staleness(first, _metrics(out), bound=1)
    assert worst == 1  # steps 2.. trained on the previous version's data: rollout and training overlapped
    assert partial > 0  # a weight sync interrupted running generations, which were resumed

    p = subprocess.run(_cmd(assets, out, "--resume", **{"trainer.async_mode": "one_step",
                                                        "trainer.steps": ckpt + 3}),
                       env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"(step {ckpt})" in p.stdout
    records = _trained(out)
    assert [r["step"] for r in records] == list(range(1, ckpt + 4))
    _check_staleness(records[ckpt:], _metrics(out), bound=1)
    want = _sampler_order(ckpt + 3, 4, seed=3, train_file=assets["train"])
    assert [r["prompts"] for r in records] == want  # no prompt lost, none trained twice, in the sampler's order


@pytest.mark.slow
def test_bounded_respects_max_staleness(assets, tmp_path):
    """bounded, max_staleness=2, a fast engine and a slow actor: the producer runs up to two steps ahead, never
    more (the version gate)."""
    out = str(tmp_path)
    p = subprocess.run(_cmd(assets, out, **{"trainer.async_mode": "bounded", "trainer.max_staleness": 2,
                                            "trainer.steps": 6}),
                       env=_env(out, decode_sleep=0.0, train_sleep=1.5), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    worst, _ = _check_staleness(_trained(out), _metrics(out), bound=2)
    assert worst == 2, worst  # it did run two steps ahead


@pytest.mark.slow
def test_one_step_step_time_is_the_max_not_the_sum(tmp_path):
    """tools/bench_async.py (off vs one_step, slow engine + slow actor): a generous sanity only; the measured
    numbers are in docs/benchmarks.md."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_async.py"), "--steps", "5", "--json",
                        "--out", str(tmp_path)], env=trainer_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    off, one = res["off"], res["one_step"]
    assert off["staleness_max"] == 0 and one["staleness_max"] == 1
    assert one["step"] < 0.9 * off["step"], res
    assert one["step"] < one["sum"], res


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_producer_version_gate_and_consumed_data_position(max_staleness):
    """The producer (a real thread, a collect function in place of rollout) runs exactly max_staleness + 1 steps
    ahead of the engine's weight version; the trainer's sampler takes the position of the step it consumes,
    not the producer's (which is ahead)."""
    from rfpo_megatron.config import Config
    from rfpo_megatron.data.sampler import PromptSampler
    from rfpo_megatron.data.types import RolloutGroup
    from rfpo_megatron.logging.metrics import InternalizationTracker
    from rfpo_megatron.train.async_rollout import RolloutProducer, consume
    from rfpo_megatron.train.runtime import Runtime

    class Engine:  # what the producer calls on the engine when it stops
        def abort(self, rid=None):
            pass

    rt = Runtime(Config(), sampler=PromptSampler(100, 2, seed=0, shuffle=False), tracker=InternalizationTracker(),
                 engine=Engine())
    started = []

    def collect(view, step, m):
        started.append(step)
        m["rollout/x"] = float(step)
        return [RolloutGroup(prompt_ids=[1], record={"id": i}) for i in view.sampler.next_indices()]

    producer = RolloutProducer(rt, collect, start_step=1, version=0, max_staleness=max_staleness)
    try:
        def wait_started(n):
            deadline = time.time() + 10
            while len(started) < n and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # and nothing more starts
            return list(started)

        assert wait_started(max_staleness + 1) == list(range(1, max_staleness + 2))
        for k in range(1, 4):
            m = {}
            groups = consume(rt, producer.get(k, timeout_s=10), k, m)
            assert [g.record["id"] for g in groups] == [2 * (k - 1), 2 * k - 1]
            assert rt.sampler.state_dict()["position"] == 2 * k  # the consumed step's, not the producer's
            assert m["rollout/x"] == k
            producer.set_version(k)  # the sync of step k
            assert wait_started(k + max_staleness + 1) == list(range(1, k + max_staleness + 2))
    finally:
        producer.stop(timeout_s=5)
    assert not producer._thread.is_alive()
