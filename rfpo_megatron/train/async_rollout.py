"""Rollout overlapped with training (trainer.async_mode one_step | bounded): a producer thread on rank 0.

The producer runs the trainer's own rollout -> reward -> fix stage (`collect`, i.e. trainer.collect_groups) for
step s, s+1, ... and puts each finished step on a queue; the trainer takes step k's groups, trains, and syncs
the weights (version k) between engine batches. The version gate bounds the lag: the producer starts step s
only once the engine serves version >= s - 1 - max_staleness, so every token trained at step k was produced by
a version in [k - 1 - max_staleness, k - 1] (staleness = (k - 1) - Sample.weight_version <= max_staleness).
one_step is max_staleness = 1: step k+1 is generated while step k trains.

A sync pauses the engines (`sync_while_paused`: /pause_generation aborts the running requests, the update runs,
/continue_generation), and the producer's engine resumes every aborted sample with the new weights
(rollout.partial): nothing generated is lost, and each token keeps its log-prob and weight version.

The producer works on its own copies of the data sampler, internalization tracker and generation counters;
every queued step carries their state after it was produced, and the trainer adopts that state when it trains
the step (`consume`). So the trainer's Runtime -- and every checkpoint -- holds the data position of the last
prompt CONSUMED by training: prompts still in flight at a checkpoint or a SIGTERM are generated again after
a resume, never lost and never trained twice.
"""
from __future__ import annotations

import copy
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from rfpo_megatron.data.types import RolloutGroup
from rfpo_megatron.train.runtime import Preempted, Runtime
from rfpo_megatron.train.weight_sync import engine_call, sync_weights

GEN_COUNTERS = ("generations", "generated_tokens")  # the rollout-budget counters the producer advances


@dataclass
class Produced:
    """One step's finished groups, the rollout/fix metrics of making them, and the producer's state after them
    (sampler, tracker, generation counters: what the trainer holds once it trains this step)."""

    step: int
    groups: Optional[list[RolloutGroup]]
    metrics: dict[str, float]
    state: dict[str, Any]


class RolloutProducer:
    """Rank 0's rollout thread: produces steps start_step, start_step + 1, ... ahead of the trainer."""

    def __init__(self, rt: Runtime, collect: Callable[[Runtime, int, dict], Optional[list[RolloutGroup]]],
                 start_step: int, version: int, max_staleness: int):
        from rfpo_megatron.rollout.partial import ResumingEngine

        self.max_staleness = int(max_staleness)
        self.version = int(version)  # what the engine serves (the trainer step of its weights)
        self.next_step = int(start_step)
        self.stopping = False
        self.error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue()  # at most max_staleness + 1 steps (the version gate)
        self._collect = collect
        self.view = dataclasses.replace(  # the producer's Runtime: own data position, tracker, counters, stop flag
            rt, engine=ResumingEngine(rt.engine, lambda: self.stopping), sampler=copy.deepcopy(rt.sampler),
            tracker=copy.deepcopy(rt.tracker), counters={k: rt.counters.get(k, 0) for k in GEN_COUNTERS},
            stop=False, abortable=False, cleanup=[])
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = self.next_step
        try:
            while True:
                with self._cond:
                    while not self.stopping and self.version < step - 1 - self.max_staleness:
                        self._cond.wait(timeout=1.0)
                if self.stopping:
                    return
                m: dict[str, float] = {}
                groups = self._collect(self.view, step, m)
                if groups is None or self.stopping:
                    return
                v = self.view
                state = {"sampler": v.sampler.state_dict(), "tracker": copy.deepcopy(v.tracker.state_dict()),
                         "counters": dict(v.counters)}
                self._queue.put(Produced(step, groups, m, state))
                step += 1
        except Preempted:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer, raised there
            if not self.stopping:
                self.error = exc
                self._queue.put(None)

    def get(self, step: int, timeout_s: float) -> Produced:
        """Step `step`'s groups (blocks; polls so a SIGTERM is handled at once). Raises the producer's error, or
        a RuntimeError after `timeout_s` without a step (the engine's own watchdog normally fires first)."""
        deadline = time.time() + timeout_s
        while True:
            try:
                item = self._queue.get(timeout=0.2)
                break
            except queue.Empty:
                if self.error is not None:
                    raise self.error
                if not self._thread.is_alive():
                    raise RuntimeError("the rollout producer thread ended without producing step "
                                       f"{step}; see the log above")
                if time.time() > deadline:
                    raise RuntimeError(f"no rollout for step {step} within {timeout_s:.0f}s (from "
                                       f"rollout.request_timeout_s); check the rollout server log")
        if item is None:
            raise self.error if self.error is not None else RuntimeError("rollout producer failed")
        if item.step != step:
            raise RuntimeError(f"rollout producer: expected step {step}, got {item.step} (a bug)")
        return item

    def set_version(self, version: int) -> None:
        """The engine now serves the weights of trainer step `version`: later steps may start."""
        with self._cond:
            self.version = int(version)
            self._cond.notify_all()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop producing: running requests are aborted, the thread is joined (up to timeout_s)."""
        with self._cond:
            self.stopping = True
            self.view.stop = True
            self._cond.notify_all()
        try:
            self.view.engine.abort()
        except Exception:  # noqa: BLE001 - the engine may already be gone
            pass
        self._thread.join(timeout_s)


def start_producer(rt: Runtime, collect: Callable[[Runtime, int, dict], Optional[list[RolloutGroup]]]
                   ) -> RolloutProducer:
    """Rank 0: the producer for the steps after rt.step (the engine serves rt.step's weights)."""
    cfg = rt.cfg.trainer
    p = RolloutProducer(rt, collect, start_step=rt.step + 1, version=rt.step,
                        max_staleness=1 if cfg.async_mode == "one_step" else cfg.max_staleness)
    rt.cleanup.insert(0, p.stop)
    return p


def consume(rt: Runtime, item: Produced, step: int, m: dict) -> list[RolloutGroup]:
    """The trainer takes a produced step: adopts its sampler/tracker/counter state, adds its metrics and the
    staleness of its samples (rollout/staleness_mean|max; rollout/partial_frac: samples resumed after a sync)."""
    rt.sampler.load_state_dict(item.state["sampler"])
    rt.tracker.load_state_dict(copy.deepcopy(item.state["tracker"]))
    rt.counters.update(item.state["counters"])
    m.update(item.metrics)
    m.update(staleness_metrics(item.groups, step))
    return item.groups


def staleness_metrics(groups: list[RolloutGroup], step: int) -> dict[str, float]:
    """Per sample (k - 1) - weight_version at train step k: its mean and max; the fraction made of 2+ segments."""
    samples = [s for g in groups for s in g.samples]
    if not samples:
        return {}
    lag = [(step - 1) - s.weight_version for s in samples]
    return {"rollout/staleness_mean": sum(lag) / len(lag), "rollout/staleness_max": float(max(lag)),
            "rollout/partial_frac": sum(len(set(s.token_versions or ())) > 1 for s in samples) / len(samples)}


def sync_while_paused(rt: Runtime, step: int) -> None:
    """The weight sync of step `step` under async: rank 0 pauses generation (running requests return what they
    have, the producer resumes them afterwards), every rank syncs (version = step), generation continues."""
    paused = rt.is_rank0 and rt.engine is not None
    if paused:
        engine_call(rt, rt.engine.pause_generation)  # engine_call: after SIGTERM a stopped server is skipped
    try:
        sync_weights(rt, weight_version=step)
    finally:
        if paused:
            engine_call(rt, rt.engine.continue_generation)
    if rt.producer is not None:
        rt.producer.set_version(step)
