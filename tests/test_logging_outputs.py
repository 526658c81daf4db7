"""Logging: JSONL round trip and resume truncation, W&B mode resolution and the offline run's recorded
history, the console progress line and ETA, and the rollout/rfpo metric definitions on hand-built groups."""
from __future__ import annotations

import io
import json
import math
import os

import pytest
import torch

from rfpo_megatron.config import LoggingConfig
from rfpo_megatron.data.types import RolloutGroup, Sample
from rfpo_megatron.logging import (JsonlWriter, MetricsLogger, ProgressBar, find_offline_runs, format_duration,
                                   read_metrics, read_offline_history, resolve_wandb_mode)
from rfpo_megatron.logging.metrics import (InternalizationTracker, grad_signal_frac, group_flags, roff_metrics,
                                           rollout_metrics)


def test_jsonl_roundtrip_and_truncate(tmp_path):
    path = str(tmp_path / "m" / "metrics.jsonl")
    w = JsonlWriter(path)
    for s in range(1, 5):
        w.write(s, {"train/loss": 0.5 * s, "bad": float("nan"), "t": torch.tensor(2.0), "name": "x"})
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[1]["train/loss"] == 1.0 and recs[0]["bad"] is None and recs[0]["t"] == 2.0
    assert w.truncate_after(2) == 2
    w.write(3, {"train/loss": 9.0})
    w.close()
    recs = read_metrics(path)
    assert [(r["step"], r["train/loss"]) for r in recs] == [(1, 0.5), (2, 1.0), (3, 9.0)]
    with open(path, "a") as fh:  # a torn last line (killed mid-write) is skipped
        fh.write('{"step": 4, "train/lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_wandb_mode_resolution():
    assert resolve_wandb_mode("auto", {}) == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"
    assert resolve_wandb_mode("online", {}) == "online"


def test_metrics_logger_offline_wandb_and_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = LoggingConfig(log_dir=str(tmp_path / "logs"), wandb_mode="auto", console=False)
    lg = MetricsLogger(cfg, total_steps=3, config={"algo": {"adv_estimator": "grpo"}})
    assert lg.wandb.mode == "offline"
    lg.log(1, {"rfpo/zero_group_frac": 0.25, "train/loss": 0.5, "perf/step_time": 1.0})
    lg.log(2, {"rfpo/zero_group_frac": 0.5, "train/loss": 0.25, "perf/step_time": 1.0})
    run_id, run_dir = lg.wandb_run_id, lg.wandb_dir
    lg.finish()
    runs = find_offline_runs(cfg.log_dir)
    assert runs == [run_dir] and run_id in run_dir
    hist = _history(run_dir, rows=2)
    assert [(h["_step"], h["rfpo/zero_group_frac"], h["train/loss"]) for h in hist] == [(1, 0.25, 0.5), (2, 0.5, 0.25)]
    # resume from step 1: the JSONL keeps step 1 only, then continues; W&B appends to the same run id
    lg = MetricsLogger(cfg, total_steps=3, start_step=1, wandb_run_id=run_id)
    assert lg.wandb_run_id == run_id
    lg.log(2, {"train/loss": 7.0})
    lg.finish()
    recs = read_metrics(os.path.join(cfg.log_dir, "metrics.jsonl"))
    assert [(r["step"], r["train/loss"]) for r in recs] == [(1, 0.5), (2, 7.0)]


def _history(run_dir, rows, wait_s=20.0):
    """The offline run's history; the W&B service may still be flushing its file right after finish()."""
    import time

    deadline = time.time() + wait_s
    while True:
        hist = read_offline_history(run_dir)
        if len(hist) >= rows or time.time() > deadline:
            return hist
        time.sleep(0.2)


def test_wandb_disabled_writes_only_jsonl(tmp_path):
    cfg = LoggingConfig(log_dir=str(tmp_path), wandb_mode="disabled", console=False)
    lg = MetricsLogger(cfg, total_steps=1)
    lg.log(1, {"train/loss": 1.0})
    lg.finish()
    assert lg.wandb is None and find_offline_runs(str(tmp_path)) == []
    assert read_metrics(os.path.join(str(tmp_path), "metrics.jsonl"))[0]["train/loss"] == 1.0


def test_progress_line_and_eta():
    out = io.StringIO()
    bar = ProgressBar(total=10, start_step=2, stream=out)
    t0 = bar._t0
    line = bar.line(4, {"rollout/reward_mean": 0.4, "train/loss": float("nan")}, now=t0 + 20.0)
    # 2 steps in 20 s -> 10 s/step, 6 steps left -> 60 s
    assert "step 4/10" in line and " 40%" in line and "10.0s/step" in line and "ETA 1m00s" in line
    assert "reward 0.4" in line and "loss" not in line
    assert bar.eta_seconds(4, now=t0 + 20.0) == pytest.approx(60.0)
    assert format_duration(3725) == "1h02m" and format_duration(59.6) == "1m00s" and format_duration(-3) == "0s"
    bar.update(5, {})
    assert "step 5/10" in out.getvalue()


def _group(rewards, pid, fixed=(), lens=None, finish=None):
    samples = []
    for i, r in enumerate(rewards):
        n = (lens or [3] * len(rewards))[i]
        samples.append(Sample(prompt_ids=[1], response_ids=[2] * n, reward=r, is_fixed=i in fixed,
                              finish_reason=(finish or ["stop"] * len(rewards))[i]))
    return RolloutGroup(prompt_ids=[1], samples=samples, record={"id": pid})


def test_rollout_and_group_metrics_hand_computed():
    gs = [_group([0, 0, 0, 0], "a", lens=[1, 2, 3, 4], finish=["length", "stop", "stop", "stop"]),
          _group([1, 0, 1, 0], "b"), _group([1, 1, 1, 1], "c")]
    m = rollout_metrics(gs)
    rewards = [0, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1]
    mean = sum(rewards) / 12
    assert m["rollout/reward_mean"] == pytest.approx(mean)
    assert m["rollout/reward_std"] == pytest.approx(math.sqrt(sum((r - mean) ** 2 for r in rewards) / 12))
    assert m["rollout/accuracy"] == pytest.approx(6 / 12)
    assert m["rollout/solve_rate"] == pytest.approx(2 / 3)
    assert m["rollout/response_len_mean"] == pytest.approx((1 + 2 + 3 + 4 + 8 * 3) / 12)
    assert m["rollout/response_len_max"] == 4 and m["rollout/truncation_rate"] == pytest.approx(1 / 12)
    f = group_flags(gs)
    assert f["rfpo/zero_group_frac"] == pytest.approx(1 / 3) and f["rfpo/full_group_frac"] == pytest.approx(1 / 3)


def test_roff_and_grad_signal_metrics():
    log_roff = torch.tensor([0.0, 0.5, -2.0, 0.0])
    fixed = torch.tensor([False, True, True, False])
    m = roff_metrics(log_roff, fixed, clip=2.0)
    assert m["rfpo/fixed_seq_frac"] == 0.5
    assert m["rfpo/roff_mean"] == pytest.approx((math.exp(0.5) + math.exp(-2.0)) / 2)
    assert m["rfpo/roff_min"] == pytest.approx(math.exp(-2.0)) and m["rfpo/roff_max"] == pytest.approx(math.exp(0.5))
    assert m["rfpo/roff_clamped_frac"] == 0.5
    hist = lambda mm: [mm[f"rfpo/log_roff_hist_{i}"] for i in range(8)]  # noqa: E731  bins of 0.5 over [-2, 2]
    assert hist(m) == [1, 0, 0, 0, 0, 1, 0, 0]  # -2.0 -> bin 0 (lower end), 0.5 -> bin 5 ([0.5, 1.0))
    m2 = roff_metrics(torch.tensor([2.0, 3.0, -0.25, 0.0, 9.0]), torch.tensor([True, True, True, True, False]), 2.0)
    assert hist(m2) == [0, 0, 0, 1, 1, 0, 0, 2]  # the upper end and a value past the clip land in the last bin
    none = roff_metrics(torch.zeros(3), torch.zeros(3, dtype=torch.bool), clip=2.0)
    assert none["rfpo/roff_mean"] == 1.0 and none["rfpo/fixed_seq_frac"] == 0.0 and hist(none) == [0] * 8
    adv = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0, 0.0])
    gidx = torch.tensor([0, 0, 1, 1, 2, 2])
    assert grad_signal_frac(adv, gidx, 3) == pytest.approx(1 / 3)


def test_internalization_tracker():
    t = InternalizationTracker()
    t.update(1, [_group([0, 0], "a"), _group([0, 0], "b"), _group([1, 0], "c")])
    assert t.rate == 0.0 and sorted(t.needed) == ["a", "b"]
    # a fixed sample does not count as solving it; "c" never needed a fix
    t.update(2, [_group([0, 1], "a", fixed=(1,)), _group([1, 1], "c")])
    assert t.rate == 0.0
    t.update(3, [_group([0, 1], "a"), _group([0, 0], "d")])
    assert t.solved_later == {"a": 3} and t.rate == pytest.approx(1 / 3)
    t2 = InternalizationTracker()
    t2.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert t2.metrics() == t.metrics() == {"rfpo/internalization_rate": pytest.approx(1 / 3),
                                           "rfpo/prompts_needing_fix": 3.0}
