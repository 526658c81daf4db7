#!/usr/bin/env bash
# One SPMD rank under srun: maps SLURM_* to the torch.distributed variables and execs
# `rfpo-megatron <command> ...`. MASTER_ADDR/MASTER_PORT come from the batch script (first node).
#   srun ... bash slurm/task.sh train CONFIG.yaml key=value ...
set -euo pipefail
export RANK="${SLURM_PROCID:?task.sh must run under srun}"
export WORLD_SIZE="${SLURM_NTASKS:?}"
export LOCAL_RANK="${SLURM_LOCALID:-0}"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%(*}}"
: "${MASTER_ADDR:?set by the batch script}" "${MASTER_PORT:?set by the batch script}"
exec "${RFPO_PYTHON:-python3}" -m rfpo_megatron.cli "$@"
