# shellcheck shell=bash
# Helpers sourced by slurm/rfpo_colocated.sbatch and slurm/rfpo_disaggregated.sbatch (not run directly).
#
# Inputs (environment; all optional except RFPO_CONFIG):
#   RFPO_CONFIG            training YAML (e.g. examples/qwen2.5-32b/config.yaml, examples/tiny_cpu/config.yaml)
#   RFPO_OVERRIDES         extra "section.key=value" overrides, space separated
#   RFPO_DEVICE            auto | gpu | cpu   (cpu: gloo, no GPUs, no NCCL settings; auto: gpu if nvidia-smi works)
#   RFPO_RUN_DIR           per-run directory for heartbeat, watchdog log, SGLang logs (default outputs/slurm-<jobid>)
#   RFPO_PYTHON            interpreter with rfpo_megatron installed (default: .venv/bin/python, else python3)
#   RFPO_RESUME            1 = pass trainer.resume=true (set automatically after a requeue)
#   RFPO_IFNAME            network interface for NCCL/Gloo bootstrap + sockets (e.g. ib0, eth0, lo)
#   RFPO_MASTER_PORT       rendezvous port (default 20000 + jobid % 20000)
#   RFPO_WATCHDOG_MINUTES  no step for this long -> dump all ranks' stacks (default 30; 0 = off)
#   RFPO_WATCHDOG_STARTUP_MINUTES  allowance before the first step (default 2x the above)
#   RFPO_WATCHDOG_KILL     1 = cancel the training step after a second silent period (default 1)
set -euo pipefail

RFPO_REPO="${RFPO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$RFPO_REPO"
: "${RFPO_CONFIG:?set RFPO_CONFIG=path/to/config.yaml (e.g. examples/qwen2.5-7b/config.yaml)}"
[ -f "$RFPO_CONFIG" ] || { echo "rfpo slurm: RFPO_CONFIG=$RFPO_CONFIG: file not found (paths are relative to $RFPO_REPO)" >&2; exit 2; }
if [ -z "${RFPO_PYTHON:-}" ]; then
  if [ -x "$RFPO_REPO/.venv/bin/python" ]; then RFPO_PYTHON="$RFPO_REPO/.venv/bin/python"; else RFPO_PYTHON=python3; fi
fi
export RFPO_PYTHON
JOB_ID="${SLURM_JOB_ID:-local$$}"
RFPO_RUN_DIR="${RFPO_RUN_DIR:-$RFPO_REPO/outputs/slurm-$JOB_ID}"
mkdir -p "$RFPO_RUN_DIR"
export RFPO_RUN_DIR
HEARTBEAT="$RFPO_RUN_DIR/heartbeat"

rfpo_log() { echo "[rfpo-slurm $(date -u +%H:%M:%S)] $*" >&2; }

# cfg_get KEY... : print values of dotted config keys (after overrides), one per line
cfg_get() {
  # shellcheck disable=SC2086
  "$RFPO_PYTHON" "$RFPO_REPO/slurm/helpers.py" get "$RFPO_CONFIG" $RFPO_OVERRIDES -- "$@"
}

# ---- device switch: CPU/tiny (gloo) vs GPU (NCCL)
rfpo_device() {
  local dev="${RFPO_DEVICE:-auto}"
  if [ "$dev" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then dev=gpu; else dev=cpu; fi
  fi
  case "$dev" in cpu|gpu) echo "$dev" ;; *) echo "rfpo slurm: RFPO_DEVICE=$dev must be auto, cpu or gpu" >&2; exit 2 ;; esac
}

# ---- rendezvous: MASTER_ADDR = first node of the allocation, port derived from the job id
rfpo_rendezvous() {
  local nodes
  nodes="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname -s)}" 2>/dev/null || hostname -s)"
  export MASTER_ADDR="${MASTER_ADDR:-$(echo "$nodes" | head -n1)}"
  local jid="${SLURM_JOB_ID:-$$}"
  export MASTER_PORT="${RFPO_MASTER_PORT:-$((20000 + jid % 20000))}"
  RFPO_NODES="$nodes"
}

# ---- network: which interface NCCL and Gloo use (the most common multi-node start-up hang)
rfpo_network_env() {
  local dev="$1"
  if [ -n "${RFPO_IFNAME:-}" ]; then
    export GLOO_SOCKET_IFNAME="$RFPO_IFNAME"
    [ "$dev" = gpu ] && export NCCL_SOCKET_IFNAME="$RFPO_IFNAME"
  fi
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
  if [ "$dev" = gpu ]; then
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # megatron TP/SP overlap needs 1
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    export CUDA_VISIBLE_DEVICES=""
  fi
}

# ---- resume: a requeued job (SLURM_RESTART_COUNT > 0) or RFPO_RESUME=1 continues from `latest`
rfpo_resume_override() {
  if [ "${RFPO_RESUME:-0}" = 1 ] || [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    echo "trainer.resume=true"
  fi
}

# ---- watchdog (background, batch node): no heartbeat for T minutes -> stack dumps of every rank
rfpo_start_watchdog() {  # rfpo_start_watchdog STEP_NAME
  local minutes="${RFPO_WATCHDOG_MINUTES:-30}"
  [ "$minutes" = 0 ] && return 0
  "$RFPO_PYTHON" "$RFPO_REPO/slurm/watchdog.py" --heartbeat "$HEARTBEAT" --minutes "$minutes" \
    --startup-minutes "${RFPO_WATCHDOG_STARTUP_MINUTES:-$(( minutes * 2 ))}" \
    --slurm-step-name "$1" --log "$RFPO_RUN_DIR/watchdog.log" \
    $([ "${RFPO_WATCHDOG_KILL:-1}" = 1 ] && echo --kill) &
  RFPO_WATCHDOG_PID=$!
}

# ---- preemption / time limit: SIGTERM to the trainer's tasks (they checkpoint and exit), then requeue.
# Only the task processes get it (`scontrol listpids` on every node, LOCALID != -): signalling srun makes it
# abort the step (SIGKILL after KillWait), and `scancel --signal` would also hit the ranks' children (the
# rollout server) before the trainer has checkpointed.
rfpo_signal_tasks() {  # rfpo_signal_tasks SIG JOB.STEP...
  local sig="$1" s; shift
  for s in "$@"; do
    srun --overlap --jobid="${s%%.*}" --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks="${SLURM_JOB_NUM_NODES:-1}" -J rfpo-signal \
      bash -c "scontrol listpids $s 2>/dev/null | awk 'NR>1 && \$4 != \"-\" {print \$1}' | xargs -r kill -$sig" || true
  done
}
RFPO_TRAIN_PID=""
rfpo_on_preempt() {
  rfpo_log "got the pre-timeout/preemption signal: checkpointing (SIGTERM to the trainer) and requeueing"
  local steps=""
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    steps="$(squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' 2>/dev/null | awk '$2 == "rfpo-train" {print $1}')"
  fi
  if [ -n "$steps" ]; then
    # shellcheck disable=SC2086
    rfpo_signal_tasks TERM $steps
  elif [ -n "$RFPO_TRAIN_PID" ]; then
    kill -TERM "$RFPO_TRAIN_PID" 2>/dev/null || true
  fi
  if [ -n "$RFPO_TRAIN_PID" ]; then wait "$RFPO_TRAIN_PID" || true; fi
  [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"
  exit 0
}

rfpo_cleanup() {
  [ -n "${RFPO_WATCHDOG_PID:-}" ] && kill "$RFPO_WATCHDOG_PID" 2>/dev/null || true
  for p in ${RFPO_SERVICE_PIDS:-}; do kill "$p" 2>/dev/null || true; done
}

# ---- SGLang servers started by the batch script (one srun step per node, one server per sglang_tp GPUs)
# rfpo_start_sglang NODE_OFFSET NUM_NODES GPUS_PER_NODE MEM_FRACTION EXTRA_FLAGS -> sets RFPO_SGLANG_URLS
# Each server: --tp-size, --mem-fraction-static, EXTRA_FLAGS (--enable-memory-saver when colocated) and
# --enable-deterministic-inference when rollout.deterministic_inference is true (SGLang ignores sampling
# seeds without it), --enable-return-routed-experts when the run keeps MoE routing (rollout.return_routed_experts
# or actor.router_replay=rollout). The router (several servers): Prometheus on a port of its own next to the servers'
# (0.3.x would bind 0.0.0.0:29000), the health check on /get_model_info (SGLang's /health generates a token
# on an idle server, on released memory when colocated) and no router retries (same rid resent on a 5xx).
rfpo_start_sglang() {
  local offset="$1" nnodes="$2" gpn="$3" frac="$4" extra="$5"
  local model tp per_node base_port urls="" n i host
  unset RFPO_ROUTER_URL  # set below only when a router is started here and answers /health
  model="$(cfg_get actor.hf_model_path)"; tp="$(cfg_get rollout.sglang_tp)"
  if [ "$(cfg_get rollout.deterministic_inference)" = true ]; then extra="$extra --enable-deterministic-inference"; fi
  if [ "$(cfg_get rollout.return_routed_experts)" = true ] || [ "$(cfg_get actor.router_replay)" = rollout ]; then
    extra="$extra --enable-return-routed-experts"  # MoE routing for R3 (docs/rollout.md)
  fi
  per_node=$(( gpn / tp )); [ "$per_node" -ge 1 ] || { echo "rfpo slurm: rollout.sglang_tp=$tp > $gpn GPUs per node" >&2; exit 2; }
  base_port=$(( MASTER_PORT + 100 ))
  mkdir -p "$RFPO_RUN_DIR/sglang"
  for n in $(seq 0 $(( nnodes - 1 ))); do
    host="$(echo "$RFPO_NODES" | sed -n "$(( offset + n + 1 ))p")"
    for i in $(seq 0 $(( per_node - 1 ))); do
      urls="$urls http://$host:$(( base_port + i ))"
    done
    # shellcheck disable=SC2086
    srun --overlap --nodes=1 --ntasks=1 --relative="$(( offset + n ))" --gpus-per-node="$gpn" -J rfpo-sglang \
      -o "$RFPO_RUN_DIR/sglang/node$(( offset + n )).log" bash -c '
        for i in $(seq 0 '"$(( per_node - 1 ))"'); do
          CUDA_VISIBLE_DEVICES=$(seq -s, $(( i * '"$tp"' )) $(( i * '"$tp"' + '"$tp"' - 1 ))) \
          '"$RFPO_PYTHON"' -m sglang.launch_server --model-path '"$model"' --tp-size '"$tp"' --host 0.0.0.0 \
            --port $(( '"$base_port"' + i )) --mem-fraction-static '"$frac"' '"$extra"' &
        done
        wait' &
    RFPO_SERVICE_PIDS="${RFPO_SERVICE_PIDS:-} $!"
  done
  RFPO_SGLANG_URLS="$(echo $urls)"
  # shellcheck disable=SC2086
  "$RFPO_PYTHON" "$RFPO_REPO/slurm/helpers.py" wait-http --timeout "${RFPO_SGLANG_STARTUP_S:-1800}" \
    $(for u in $RFPO_SGLANG_URLS; do echo "$u/health"; done) \
    || { echo "rfpo slurm: SGLang servers did not become healthy; logs in $RFPO_RUN_DIR/sglang/" >&2; exit 3; }
  rfpo_log "SGLang up: $RFPO_SGLANG_URLS"
  local nurls; nurls=$(echo "$RFPO_SGLANG_URLS" | wc -w)
  if [ "$nurls" -gt 1 ] && [ "${RFPO_SGLANG_ROUTER:-1}" = 1 ]; then
    host="$(echo "$RFPO_NODES" | sed -n "$(( offset + 1 ))p")"
    # shellcheck disable=SC2086
    srun --overlap --nodes=1 --ntasks=1 --relative="$offset" -J rfpo-router -o "$RFPO_RUN_DIR/sglang/router.log" \
      "$RFPO_PYTHON" -m sglang_router.launch_router --host 0.0.0.0 --port $(( base_port + 99 )) \
      --worker-urls $RFPO_SGLANG_URLS --prometheus-host 0.0.0.0 --prometheus-port $(( base_port + 98 )) \
      --health-check-endpoint /get_model_info --disable-retries \
      --request-timeout-secs "$(cfg_get rollout.request_timeout_s | cut -d. -f1)" &
    RFPO_SERVICE_PIDS="$RFPO_SERVICE_PIDS $!"
    export RFPO_ROUTER_URL="http://$host:$(( base_port + 99 ))"
    "$RFPO_PYTHON" "$RFPO_REPO/slurm/helpers.py" wait-http --timeout 300 "$RFPO_ROUTER_URL/health" \
      || { rfpo_log "router did not come up (the trainer round-robins over the servers instead)"; unset RFPO_ROUTER_URL; }
  fi
}

# the trainer overrides for the servers started by rfpo_start_sglang, one per line (read them into an array:
# `mapfile -t URLS < <(rfpo_urls_override)`): rollout.server_urls in the YAML flow-list form the config loader
# accepts, and rollout.router_url when the router came up (generation goes to it, weight sync to each server)
rfpo_urls_override() {
  local list; list="$(echo "$RFPO_SGLANG_URLS" | sed 's/ /,/g')"
  echo "rollout.server_urls=[$list]"
  if [ -n "${RFPO_ROUTER_URL:-}" ]; then echo "rollout.router_url=$RFPO_ROUTER_URL"; fi
}

# ---- the SPMD trainer: one task per GPU (or per CPU rank), rank/world/master from SLURM_* via slurm/task.sh
# rfpo_run_trainer NODE_OFFSET NUM_NODES TASKS_PER_NODE EXTRA_OVERRIDES...
rfpo_run_trainer() {
  local offset="$1" nnodes="$2" tpn="$3"; shift 3
  local args=(--nodes="$nnodes" --ntasks="$(( nnodes * tpn ))" --ntasks-per-node="$tpn" --kill-on-bad-exit=1 --label
              -J rfpo-train)
  [ "$offset" -gt 0 ] && args+=(--relative="$offset")
  rfpo_start_watchdog rfpo-train
  # shellcheck disable=SC2086
  srun "${args[@]}" bash "$RFPO_REPO/slurm/task.sh" train "$RFPO_CONFIG" \
    trainer.heartbeat_file="$HEARTBEAT" $RFPO_OVERRIDES "$@" $(rfpo_resume_override) &
  RFPO_TRAIN_PID=$!
  local rc=0
  wait "$RFPO_TRAIN_PID" || rc=$?
  # `wait` returns >128 when a trapped signal interrupted it; the trap handler exits by itself
  RFPO_TRAIN_PID=""
  return "$rc"
}
