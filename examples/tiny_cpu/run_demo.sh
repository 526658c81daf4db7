#!/usr/bin/env bash
# The README demo (`make demo`): warm start + RFPO training of the tiny Qwen2-shaped model on 2 CPU cores.
#
#   1. examples/tiny_cpu/prepare.py   char tokenizer, addition data, tiny model, short SFT warm start
#                                      (idempotent: skipped when the artifacts exist)
#   2. rfpo-megatron train            RFPO on easy+hard addition prompts, embedded rollout engine over
#                                      loopback, eval on held-out easy/hard sets, W&B offline, checkpoints
#
# usage: examples/tiny_cpu/run_demo.sh [section.key=value ...]   (overrides go to the trainer)
# env:   PYTHON (default .venv/bin/python), RFPO_DEMO_CONFIG (default examples/tiny_cpu/config.yaml),
#        OMP_NUM_THREADS (default 1), WANDB_API_KEY (set it to log online instead of offline)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"
CONFIG="${RFPO_DEMO_CONFIG:-examples/tiny_cpu/config.yaml}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the tiny model is faster single-threaded
export TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

start=$(date +%s)
echo "== [1/2] warm start: tokenizer, data, tiny model, SFT (examples/tiny_cpu/prepare.py)"
"$PY" examples/tiny_cpu/prepare.py
mid=$(date +%s)
echo "== [1/2] done in $((mid - start))s"

echo "== [2/2] RFPO training: $CONFIG $*"
"$PY" -m rfpo_megatron.cli train "$CONFIG" "$@"
end=$(date +%s)
echo "== [2/2] done in $((end - mid))s; demo total $((end - start))s"
