"""Parallel initialisation: torch.distributed + megatron-core TP/PP/DP groups + RNG seeds.

Reads the rendezvous from the environment: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
(torchrun) or ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (srun), plus
``MASTER_ADDR``/``MASTER_PORT`` (default 127.0.0.1:29500). Without any of them a
single-process world is created. Backend: nccl when CUDA is available, gloo
otherwise (then the CPU compat layer is enabled first).
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rfpo_megatron.actor.compat import enable_cpu_compat


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's coordinates in the (tp, pp, dp) grid (and the expert grid of MoE models)."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str
    vpp: int | None = None  # virtual pipeline stages (model chunks) per rank; None = not interleaved
    ep: int = 1  # expert-parallel size (MoE): experts spread over ep ranks
    etp: int = 1  # expert tensor-parallel size (MoE)
    ep_rank: int = 0


def _env_int(*names: str, default: int | None = None) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return default


def _rendezvous() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables; sets MASTER_* defaults."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if "MASTER_ADDR" not in os.environ and (_env_int("SLURM_NNODES", default=1) or 1) > 1:
        raise RuntimeError(
            "MASTER_ADDR is not set for a multi-node Slurm job; export MASTER_ADDR=<first node of "
            "$SLURM_JOB_NODELIST> (and MASTER_PORT) in the sbatch script"
        )
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world}; check the launcher's environment")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    return int(rank), int(world), int(local)


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    backend: str | None = None,
    timeout_s: float = 600.0,
    vpp: int | None = None,
    ep: int = 1,
    etp: int | None = None,
) -> ParallelInfo:
    """Initialise torch.distributed (if needed) and megatron's model-parallel groups.

    ``tp * pp`` must divide the world size; the rest is data parallel. Seeds python,
    numpy, torch and megatron's (CPU or CUDA) RNG tracker like megatron's
    ``model_parallel_cuda_manual_seed`` (data-parallel seed = ``seed``, TP seed =
    ``seed + 2718 + tp_rank``). Idempotent for the same (tp, pp, vpp).

    ``vpp`` (``actor.virtual_pipeline_model_parallel_size``): model chunks per pipeline rank for
    megatron's interleaved 1F1B schedule; None (or 1) = off. Needs ``pp > 1``.

    ``ep`` / ``etp`` (``actor.expert_model_parallel_size`` / ``expert_tensor_parallel_size``, MoE only): the
    experts are spread over ``ep`` ranks and each expert's linears split over ``etp`` ranks (None = ``tp``,
    megatron's default); ``etp * ep * pp`` must divide the world size, the rest is expert data parallel.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        enable_cpu_compat()
    backend = backend or ("nccl" if on_gpu else "gloo")
    rank, world, local = _rendezvous()
    if tp < 1 or pp < 1 or world % (tp * pp) != 0:
        raise ValueError(
            f"actor.tp={tp} x actor.pp={pp} must divide the world size {world}; "
            "change tp/pp or the number of processes"
        )
    etp_size = tp if etp is None else etp
    if ep < 1 or etp_size < 1 or world % (etp_size * ep * pp) != 0:
        raise ValueError(
            f"actor.expert_tensor_parallel_size={etp_size} x actor.expert_model_parallel_size={ep} x "
            f"actor.pp={pp} must divide the world size {world}; change the expert sizes or the number of processes"
        )
    if vpp == 1:
        vpp = None  # one chunk per rank is the plain schedule
    if vpp is not None and (vpp < 1 or pp < 2):
        raise ValueError(
            f"actor.virtual_pipeline_model_parallel_size={vpp} needs actor.pipeline_model_parallel_size > 1 "
            f"(got {pp}); set it to null or raise the pipeline size"
        )
    if on_gpu:
        torch.cuda.set_device(local % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    if mpu.model_parallel_is_initialized():
        if (
            mpu.get_tensor_model_parallel_world_size() != tp
            or mpu.get_pipeline_model_parallel_world_size() != pp
            or mpu.get_virtual_pipeline_model_parallel_world_size() != vpp
            or mpu.get_expert_model_parallel_world_size() != ep
            or mpu.get_expert_tensor_parallel_world_size() != etp_size
        ):
            raise RuntimeError("init_parallel called again with different tp/pp/vpp/ep/etp; call destroy_parallel() first")
    else:
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp_size,
            distributed_timeout_minutes=max(1, int(timeout_s // 60)),
            create_gloo_process_groups=(backend == "nccl"),
        )
    set_seed(seed)
    return parallel_info()


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch (offset by pp rank like megatron) and the TP RNG tracker."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    s = seed + 100 * mpu.get_pipeline_model_parallel_rank()
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    if not torch.cuda.is_available():
        enable_cpu_compat()  # (re)installs the CPU tracker
    tensor_parallel.model_parallel_cuda_manual_seed(s)


def parallel_info() -> ParallelInfo:
    """The current rank's ParallelInfo (requires init_parallel)."""
    from megatron.core import parallel_state as mpu

    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp=mpu.get_tensor_model_parallel_world_size(),
        pp=mpu.get_pipeline_model_parallel_world_size(),
        dp=mpu.get_data_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        backend=dist.get_backend(),
        vpp=mpu.get_virtual_pipeline_model_parallel_world_size(),
        ep=mpu.get_expert_model_parallel_world_size(),
        etp=mpu.get_expert_tensor_parallel_world_size(),
        ep_rank=mpu.get_expert_model_parallel_rank(),
    )


def destroy_parallel(keep_process_group: bool = False) -> None:
    """Tear down megatron's groups and (unless ``keep_process_group``) the default process group.

    With ``keep_process_group=True`` a later ``init_parallel`` may choose a new (tp, pp).
    """
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()
