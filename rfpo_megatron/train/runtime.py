"""The trainer's runtime state and control: Runtime, SIGTERM -> Preempted, stage timing, seeds, heartbeat.

`Runtime` is everything the loop holds. A SIGTERM sets `Runtime.stop`; inside an `abortable` block it raises
`Preempted` at once (nothing changed yet: the step is dropped), elsewhere the loop checks `stop_requested`
at step end. `step_seed` makes every sampling seed a pure function of (trainer.seed, step, stream).
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from rfpo_megatron.config import Config

if TYPE_CHECKING:  # types only: nothing below is imported at run time
    from transformers import PreTrainedTokenizerBase

    from rfpo_megatron.actor.actor import Actor
    from rfpo_megatron.actor.critic import Critic
    from rfpo_megatron.data.sampler import PromptSampler
    from rfpo_megatron.data.template import PromptFormat
    from rfpo_megatron.logging import MetricsLogger
    from rfpo_megatron.logging.metrics import InternalizationTracker
    from rfpo_megatron.rewards.base import Verifier
    from rfpo_megatron.rollout.client import EngineClient

SEED_ROLLOUT, SEED_FIX, SEED_EVAL, SEED_REFILL = 0, 1, 2, 10  # sampling-seed streams (step_seed)


class Preempted(Exception):
    """Raised (by the SIGTERM handler or the loop) to stop a step before it changed any state."""


@dataclass
class Runtime:
    """Everything the loop holds: config, parallel info, actor, engine, data, logger, tracker, step."""

    cfg: Config
    rank: int = 0
    world_size: int = 1
    actor: Optional["Actor"] = None
    ref_actor: Optional["Actor"] = None  # KL loss / KL in reward / actor.use_reference: frozen, no optimizer
    critic: Optional["Critic"] = None  # algo.adv_estimator=gae: the value model
    engine: Optional["EngineClient"] = None  # rank 0 (and the sync ranks of later pipeline stages)
    tokenizer: Optional["PreTrainedTokenizerBase"] = None
    prompt_format: Optional["PromptFormat"] = None
    prompts: list[dict[str, Any]] = field(default_factory=list)  # data.train_files records
    sampler: Optional["PromptSampler"] = None
    verifier: Optional["Verifier"] = None  # rank 0 only
    generate_fn: Optional[Callable[..., Any]] = None  # rollout.generate_fn, loaded on first use (rank 0)
    eval_sets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # set name -> records (rank 0)
    logger: Optional["MetricsLogger"] = None  # rank 0 only
    tracker: Optional["InternalizationTracker"] = None
    pad_id: int = 0
    eos_ids: list[int] = field(default_factory=list)
    step: int = 0
    snapshot: dict[str, Any] = field(default_factory=dict)  # capture_state() of the last completed step
    stop: bool = False  # SIGTERM seen
    engine_lost: bool = False  # SIGTERM: the rollout servers went away with it (the weight sync skips them)
    abortable: bool = False  # the current stage may be abandoned (no state changed yet)
    cleanup: list[Callable[[], Any]] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)  # generations / tokens (rollout budget), KL β
    last_checkpoint: str = ""
    resumed_wandb_id: Optional[str] = None
    weight_group: Any = None  # rollout.weight_sync=distributed: the trainer -> servers torch process group
    weight_syncs: int = 0  # rollout.weight_sync=disk: syncs written by this process (names the directories)
    producer: Any = None  # trainer.async_mode != off: the rank-0 RolloutProducer (train.async_rollout)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def log(self, text: str) -> None:
        if self.is_rank0:
            print(f"[rfpo-megatron] {text}", flush=True)


@contextmanager
def timed(metrics: dict, key: str, accumulate: bool = False):
    """Add the wall time of the block (seconds) to metrics[key]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        metrics[key] = metrics.get(key, 0.0) + dt if accumulate else dt


@contextmanager
def abortable(rt: Runtime, collective: bool = False):
    """Inside the block a SIGTERM raises Preempted at once: nothing has changed state yet, so the step
    is dropped and the checkpoint of the previous step is written. Blocks that run collectives are
    abortable only in a single process (with several ranks the stop flag is agreed on at step end)."""
    can = rt.world_size == 1 or (rt.is_rank0 and not collective)
    if rt.stop and can:
        raise Preempted()
    rt.abortable = can
    try:
        yield
    finally:
        rt.abortable = False


def install_signal_handlers(rt: Runtime) -> None:
    """SIGTERM/SIGINT -> checkpoint and exit; SIGUSR1 -> dump all threads' stacks to stderr."""
    def on_term(signum, frame):
        first = not rt.stop
        rt.stop = True
        if first:
            print(f"[rfpo-megatron] rank {rt.rank}: got signal {signum}; checkpointing and exiting",
                  file=sys.stderr, flush=True)
        if rt.abortable:
            rt.abortable = False
            raise Preempted()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)


def any_rank(rt: Runtime, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (MAX all-reduce when distributed)."""
    if rt.world_size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


STOP_GRACE_S = 2.0  # how long an engine error waits for the SIGTERM that may be on its way (stopping_error)


def stopping_error(rt: Runtime, exc: BaseException) -> bool:
    """Whether `exc`, raised by rank 0's engine-facing work (rollout, fix stage, eval, weight sync), is the job
    stopping rather than a failure: a SIGTERM was seen, or arrives within STOP_GRACE_S of an engine error.
    Slurm signals every process of the job step, the trainer's own rollout servers too: a server that the
    signal stopped fails a request that may reach the trainer before the trainer's own signal does."""
    if isinstance(exc, Preempted):
        return True
    from rfpo_megatron.rollout.base import EngineError

    if not rt.stop and isinstance(exc, EngineError):
        deadline = time.monotonic() + STOP_GRACE_S
        while not rt.stop and time.monotonic() < deadline:
            time.sleep(0.05)
    if rt.stop:
        rt.log(f"SIGTERM: {type(exc).__name__} ({str(exc)[:200]}) taken as the job stopping")
    return rt.stop


def stop_requested(rt: Runtime) -> bool:
    """Whether any rank saw SIGTERM (all ranks agree)."""
    rt.stop = any_rank(rt, rt.stop)
    return rt.stop


def budget_reached(rt: Runtime) -> bool:
    """Whether rank 0's rollout budget (`rt.counters["generations"]`) reached `trainer.max_generations`
    (rank 0 decides, all ranks agree)."""
    cap = rt.cfg.trainer.max_generations
    if cap is None:
        return False
    return any_rank(rt, rt.is_rank0 and rt.counters.get("generations", 0) >= cap)


def broadcast_groups(rt: Runtime, groups: Optional[list]) -> Optional[list]:
    """Rank 0's groups to every rank (None means "preempted: stop before the update")."""
    if rt.world_size == 1:
        return groups
    import torch.distributed as dist

    box = [groups]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(rt: Runtime) -> None:
    """All ranks wait here (a no-op in a single process)."""
    if rt.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def touch(path: Optional[str]) -> None:
    """Create `path` or bump its mtime (the watchdog's liveness signal)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a"):
        os.utime(path, None)


def step_seed(cfg: Config, step: int, stream: int = SEED_ROLLOUT) -> int:
    """The sampling seed of `stream` (rollout, fix, eval, refill rounds) at `step`: a pure function of
    (trainer.seed, step, stream), so a resumed run replays exactly what the uninterrupted one sampled."""
    from rfpo_megatron.rollout.base import derive_seed

    return derive_seed(int(cfg.trainer.seed), int(step), int(stream))
