#!/usr/bin/env bash
# One prepared GPU check (issue 19; docs/benchmarks.md, "GPU (H200)"):
#
#   bash tools/gpu_check.sh OUTDIR             on a CUDA machine: install the carried wheels, run the check
#   bash tools/gpu_check.sh OUTDIR --dry-run   the same on CPU with the project's .venv (tiny shapes, Triton
#                                              interpreter, gloo); nothing is installed
#   ... --only=KEY[,KEY]                       only these steps (d_environment, a_kernel_correctness,
#                                              b_kernel_speed, c_actor_0.5b, c_actor_1.5b)
#   bash tools/gpu_check.sh --list-wheels      the wheels below, one per line (tools/gpu_check_wheels.sh fetches them)
#
# On CUDA, each wheel of WHEELS is pip-installed from $GPU_CHECK_WHEELS (default .gpu_wheels, carried with the
# call) with --no-index --no-deps into $GPU_CHECK_SITE (default /tmp/gpu_check_site), put first on PYTHONPATH
# with the repository root. Then tools/gpu_check.py runs steps d, a, b, c (each in its own time-boxed process,
# all within GPU_CHECK_BUDGET_S, default 450 s) and writes OUTDIR/gpu_check.json, gpu_check.md, gpu_check.log.
# A failing step is recorded and the others still run. Exit status: 0 all steps ok, 1 some not, 2 usage.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# What the GPU image (Python 3.12.3, torch 2.11.0+cu130, triton 3.6.0, numpy, pyyaml, safetensors, packaging;
# no megatron-core, TransformerEngine or SGLang) lacks for the check: cp312 wheels, installed with --no-deps.
# megatron-core 0.16.1 needs only torch, numpy and packaging (all in the image).
WHEELS=(megatron-core==0.16.1)

OUT=""
DRY=0
ONLY=()
for a in "$@"; do
  case "$a" in
    --list-wheels) printf '%s\n' "${WHEELS[@]}"; exit 0 ;;
    --dry-run) DRY=1 ;;
    --only=*) ONLY=(--only "${a#--only=}") ;;  # a rerun of some steps: --only=c_actor_0.5b,c_actor_1.5b
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $a" >&2; exit 2 ;;
    *) OUT=$a ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: tools/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
BUDGET=${GPU_CHECK_BUDGET_S:-450}
WHEEL_DIR=${GPU_CHECK_WHEELS:-$ROOT/.gpu_wheels}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
echo "===== gpu_check.sh $(date -u '+%Y-%m-%d %H:%M:%S') UTC: $OUT (dry run: $DRY) =====" >>"$LOG"

wheel_file() {  # the wheel of NAME==VERSION in $WHEEL_DIR ('' when absent)
  local name=${1%%==*} ver=${1##*==}
  name=$(echo "$name" | tr 'A-Z-' 'a-z_')
  ls "$WHEEL_DIR"/"$name"-"$ver"-*.whl 2>/dev/null | head -1
}

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  present=()
  for w in "${WHEELS[@]}"; do [ -n "$(wheel_file "$w")" ] && present+=("$w"); done
  export GPU_CHECK_INSTALL="dry run, nothing installed (${#present[@]} of ${#WHEELS[@]} wheels present in $WHEEL_DIR)"
  set -- "$OUT" --dry-run --budget-s "$BUDGET" ${ONLY[@]+"${ONLY[@]}"}
else
  PY=${PYTHON:-python3}
  files=()
  missing=()
  for w in "${WHEELS[@]}"; do
    f=$(wheel_file "$w")
    if [ -n "$f" ]; then files+=("$f"); else missing+=("$w"); fi
  done
  status="ok: ${WHEELS[*]}"
  if [ ${#missing[@]} -gt 0 ]; then
    status="failed: missing in $WHEEL_DIR: ${missing[*]} (run tools/gpu_check_wheels.sh here and carry the folder)"
  fi
  if [ ${#files[@]} -gt 0 ]; then
    echo "===== install: ${files[*]} -> $SITE =====" >>"$LOG"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${files[@]}" >>"$LOG" 2>&1; then
      status="failed: pip install (see gpu_check.log)"
    fi
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export GPU_CHECK_INSTALL="$status"
  echo "install: $status"
  set -- "$OUT" --budget-s "$BUDGET" ${ONLY[@]+"${ONLY[@]}"}
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2
# the driver time-boxes every step; this outer limit only guards against a hung driver
guard=()
command -v timeout >/dev/null && guard=(timeout -k 10 $((BUDGET + 30)))
${guard[@]+"${guard[@]}"} "$PY" tools/gpu_check.py "$@"
