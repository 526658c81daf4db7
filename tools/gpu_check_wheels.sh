#!/usr/bin/env bash
# Download the wheels tools/gpu_check.sh installs on the GPU machine (`bash tools/gpu_check.sh --list-wheels`:
# cp312, manylinux x86-64, --no-deps) into .gpu_wheels/ (ignored by git), so that a session can carry it:
#   run(command="bash tools/gpu_check.sh $OUT", carry=[".gpu_wheels"], timeout_s=540)
# Also `make gpu-check-wheels`. Prints each wheel's size and what would travel (tree + wheels; limit 64 MiB).
#   PYTHON (default .venv/bin/python, else python3)   GPU_CHECK_WHEELS (default .gpu_wheels)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DIR=${GPU_CHECK_WHEELS:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mapfile -t WHEELS < <(bash tools/gpu_check.sh --list-wheels)
mkdir -p "$DIR"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none "${platforms[@]}" -d "$DIR" "${WHEELS[@]}"
# keep exactly the listed wheels (one version each: two would stop the install there)
for f in "$DIR"/*.whl; do
  keep=0
  for w in "${WHEELS[@]}"; do
    name=$(echo "${w%%==*}" | tr 'A-Z-' 'a-z_')
    case "$(basename "$f")" in "$name"-"${w##*==}"-*) keep=1 ;; esac
  done
  [ $keep = 1 ] || { echo "removing $(basename "$f") (not in the list)"; rm -f "$f"; }
done
du -b "$DIR"/*.whl | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}'
wheels=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
awk -v w="$wheels" -v t="$tree" 'BEGIN {printf "wheels %.2f MiB + working tree %.2f MiB = %.2f MiB (limit 64 MiB)\n",
  w / 1048576, t / 1048576, (w + t) / 1048576; exit (w + t > 64 * 1048576)}'
