#!/usr/bin/env bash
# bench/gpu.py's run on a GPU machine that reaches nothing outside: install the wheel carried in
# .gpu/ (made here by `python bench/gpu.py prepare`), run, and keep the log beside gpu.json.
# Arguments go to `gpu.py run`: `bash bench/gpu.sh --only host,sampler` reruns some steps.
set -uo pipefail
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl || exit 1
# R1_KERNELS=off: r1's CPU kernels are never used there; do not spend the run compiling them.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 R1_KERNELS=off
python3 bench/gpu.py run --out "$out" "$@" 2>&1 | tee "$out/gpu.log"
