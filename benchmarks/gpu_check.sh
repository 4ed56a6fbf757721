#!/usr/bin/env bash
# One GPU, at most ~8 minutes, one table at the end: everything in this repository that needs CUDA.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: ${OUT:-./gpu_check_out}
#
# Stages (each under its own time limit, so one hang cannot eat the others' time):
#   1. the Triton kernel tests, compiled (the whole file; on CPU it runs interpreted)  <= 120 s
#   2. pytest -m gpu over the rest of tests/ (every GPU-marked test)                    <= 100 s
#   3. benchmarks/bench_kernels.py at 8K and 16K tokens                                 <=  70 s
#   4. tokenloom simulate calibrate --device cuda (curve, GEMM, HBM)                    <=  80 s
#   5. benchmarks/gpu_shapes.py (GEMM efficiency by M for TP shapes; decode vs HBM)     <=  40 s
# Each stage's log goes to OUT_DIR/<stage>.log; the summary table to OUT_DIR/summary.txt and stdout.
# Exit status: 0 when every stage passed, 1 otherwise. Needs the project's environment (python with
# torch+CUDA and tokenloom installed) on PATH or in ./.venv.
set -u
OUT_DIR="${1:-${OUT:-./gpu_check_out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
declare -a NAMES STATUS SECONDS_USED NOTES

run_stage() {  # name limit_s command...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  NAMES+=("$name"); SECONDS_USED+=("$((SECONDS - t0))")
  if [ "$rc" -eq 0 ]; then STATUS+=("ok"); elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then STATUS+=("TIMEOUT"); else STATUS+=("FAIL($rc)"); fi
  NOTES+=("$(tail -n 1 "$OUT_DIR/$name.log" | cut -c1-90)")
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || { echo "no CUDA GPU visible: nothing to check"; exit 1; }
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" | tee "$OUT_DIR/device.txt"

# A machine may lack an optional package (PuLP, Ray): a test file that cannot import is reported, not fatal.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors --durations=8)
run_stage triton 120 "${PYTEST[@]}" tests/kernels/test_triton_kernels.py
run_stage gpu_tests 100 "${PYTEST[@]}" -m gpu --ignore=tests/kernels/test_triton_kernels.py tests/
run_stage bench_kernels 70 "$PY" benchmarks/bench_kernels.py --seqs 8192,16384 --iters 3
run_stage calibrate 80 "$PY" -m tokenloom simulate calibrate --device cuda --out "$OUT_DIR/this-gpu.json"
run_stage shapes 40 "$PY" benchmarks/gpu_shapes.py --out "$OUT_DIR/shapes.json"

{
  cat "$OUT_DIR/device.txt"
  printf '%-14s %-10s %6s  %s\n' stage status secs "last line of the log"
  for i in "${!NAMES[@]}"; do
    printf '%-14s %-10s %6s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_USED[$i]}" "${NOTES[$i]}"
  done
} | tee "$OUT_DIR/summary.txt"
for s in "${STATUS[@]}"; do [ "$s" = ok ] || exit 1; done
exit 0
