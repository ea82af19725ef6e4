#!/usr/bin/env bash
# The one prepared GPU check (DESIGN.md): build curkernels._C, run the GPU tests, run the CUDA
# and Triton kernels under compute-sanitizer memcheck, time the Llama-3.1-8B layer shapes. Logs, JSON,
# markdown and PNG go to OUTDIR (default bench/results/); a short table is printed last.
# Sized for under 8 minutes on an H100.
#
#   bench/gpu_check.sh [OUTDIR]
# Knobs: PYTHON (default: .venv/bin/python if present, else python3), TORCH_CUDA_ARCH_LIST
# (default: this GPU's architecture only, to keep the build short), MAX_JOBS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results}"
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary=()
step() { echo "== $1 ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
  | tee "$OUT/device.txt"

step "build curkernels._C"
ARCH="${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
start=$SECONDS
if TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" "$PYTHON" setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1; then
  summary+=("build: ok for sm_${ARCH/./} in $((SECONDS - start)) s")
else
  tail -40 "$OUT/build.log"
  summary+=("build: FAILED (see $OUT/build.log)")
fi

step "GPU tests"
CURKERNELS_REQUIRE_EXTENSION=1 timeout 210 "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/ops -m gpu > "$OUT/gpu_tests.log" 2>&1
summary+=("gpu tests: $(tail -1 "$OUT/gpu_tests.log")")

step "compute-sanitizer memcheck"
# One run per backend: a hang in one (the Triton grid barrier) cannot hide the other's result.
for backend in cuda triton; do
  if command -v compute-sanitizer > /dev/null; then
    timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
      "$PYTHON" bench/sanitize_cuda_kernels.py "$backend" > "$OUT/memcheck_$backend.log" 2>&1
    status=$?
    summary+=("memcheck $backend: exit $status; $(grep -E 'ERROR SUMMARY|cases within' \
      "$OUT/memcheck_$backend.log" | tr '\n' ' ')")
  else
    summary+=("memcheck $backend: compute-sanitizer not found")
  fi
done

step "layer benchmark"
timeout 330 "$PYTHON" bench/layer_bench.py --out "$OUT" --budget 210 > "$OUT/bench.log" 2>&1
summary+=("benchmark: exit $? ($(grep -o '"seconds": [0-9.]*' "$OUT"/*.json | tail -1))")

echo
printf '%s\n' "${summary[@]}"
echo
tail -n 90 "$OUT/bench.log"
