#!/usr/bin/env bash
# Create or reuse the project virtual environment and install what is missing (idempotent).
#   VENV (default .venv)  PYTHON (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.rfpo_installed"
want=$(cat setup.py constraints.txt | sha1sum | cut -c1-12)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import torch, megatron.core, rfpo_megatron" 2>/dev/null; then
  "$PY" tools/fetch_sglang_ref.py  # SGLang's own code for the tests (pinned wheel, unpacked once)
  exit 0
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q -c constraints.txt "torch==2.13.0"
fi
echo "[setup] installing rfpo_megatron[dev] (editable), versions pinned by constraints.txt"
"$PY" -m pip install -q -c constraints.txt -e ".[dev]" "megatron-core>=0.16,<0.17"
echo "$want" > "$stamp"
"$PY" tools/fetch_sglang_ref.py
