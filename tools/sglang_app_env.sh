#!/usr/bin/env bash
# Separate venv in which SGLang's whole FastAPI app (sglang/srt/entrypoints/http_server.py) imports on CPU, for
# tests/test_rollout_sglang_app.py (`make test-sglang-app`). Idempotent; ~2.5 GB, a few minutes the first time.
#   SGLANG_APP_VENV (default .cache/sglang-app-venv)   PYTHON (default: the project venv's base interpreter)
#   TORCH_INDEX_URL: where to get the CPU build of torch==2.13.0 when the default index would give a CUDA one
#                    (e.g. https://download.pytorch.org/whl/cpu)
# What goes in: the pinned sglang wheel with --no-deps (SGLang's own dependency list pins CUDA torch 2.14.1,
# flashinfer, deep-gemm, ...), CPU torch 2.13.0, and the packages http_server.py's import tree needs, found by
# importing it (tests/sglang_app_child.py check). No CUDA torch, no apex. torchvision is not installed (PyPI has
# no CPU build; the child serves SGLang an empty stub module for its multimodal imports).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SGLANG_APP_VENV:-.cache/sglang-app-venv}
TORCH_SPEC="torch==2.13.0"
SGLANG_VERSION=$(python3 -c "import sys; sys.path.insert(0, 'tools'); from fetch_sglang_ref import SGLANG_REF_VERSION as v; print(v)")
# what http_server.py imports on CPU (sglang's own pins where it pins them)
PKGS=(
  "$TORCH_SPEC" triton
  fastapi "uvicorn>=0.51" uvloop orjson msgspec pydantic requests aiohttp httpx python-multipart
  numpy psutil pyzmq pillow prometheus-client setproctitle pybase64 packaging dill jsonschema einops gguf
  IPython partial_json_parser
  "transformers==5.19.0" "tokenizers==0.23.2" "sentencepiece==0.2.1" "xgrammar==0.2.7" "apache-tvm-ffi==0.1.11"
  "compressed-tensors==0.18.0" "soundfile==0.13.1" "openai==2.8.0"
)
want=$(printf '%s\n' "$SGLANG_VERSION" "${PKGS[@]}" | sha1sum | cut -c1-12)
stamp="$VENV/.rfpo_sglang_app"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "[sglang-app] $VENV is ready (sglang $SGLANG_VERSION)"
  exit 0
fi
t0=$(date +%s)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PYTHON=$(.venv/bin/python -c "import sys, os; print(os.path.join(sys.base_prefix, 'bin', 'python3'))")
  else
    PYTHON=python3
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[sglang-app] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
pipq() {  # pip install, without this machine's "Location ... is ignored" noise; pip's exit status
  "${PIP[@]}" "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}
constraints="$VENV/rfpo-constraints.txt"
echo "$TORCH_SPEC" > "$constraints"   # every later install keeps this torch

if ! "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is not None)" 2>/dev/null; then
  echo "[sglang-app] installing $TORCH_SPEC (CPU build)"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pipq "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else
    # refuse before downloading anything big when this index's torch==2.13.0 is not a CPU build
    report=$(mktemp)
    pipq --dry-run --no-deps --ignore-installed --report "$report" "$TORCH_SPEC" >/dev/null
    ver=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['install'][0]['metadata']['version'])" "$report")
    rm -f "$report"
    case "$ver" in
      *+cpu) pipq "$TORCH_SPEC" ;;
      *) echo "[sglang-app] the default index offers torch $ver, not a CPU build; rerun with" \
              "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2; exit 1 ;;
    esac
  fi
fi

echo "[sglang-app] installing what sglang/srt/entrypoints/http_server.py imports (${#PKGS[@]} packages + deps)"
pipq -c "$constraints" "${PKGS[@]}"

echo "[sglang-app] installing sglang==$SGLANG_VERSION (--no-deps: its own pins are GPU builds)"
# (pip then lists sglang's unmet GPU requirements: expected, they are left out on purpose)
pipq --no-deps "sglang==$SGLANG_VERSION" | { grep -v "requires\|dependency resolver" || true; }

# no CUDA build may have come in through a dependency
"$PY" - <<'EOF'
import importlib.metadata as md, sys
import torch
cuda = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith(("nvidia-", "apex")))
if torch.version.cuda is not None or cuda:
    sys.exit(f"[sglang-app] a CUDA build got in (torch {torch.__version__}, {cuda}); remove the venv and rerun")
print(f"[sglang-app] torch {torch.__version__} (CPU), no nvidia-* packages")
EOF

echo "[sglang-app] importing SGLang's app (tests/sglang_app_child.py check)"
"$PY" tests/sglang_app_child.py check 2>/dev/null || { "$PY" tests/sglang_app_child.py check; exit 1; }
echo "$want" > "$stamp"
echo "[sglang-app] ready: $VENV ($(du -sh "$VENV" | cut -f1), $(( $(date +%s) - t0 )) s)"
