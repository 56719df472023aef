#!/usr/bin/env bash
# One call on the GPU machine: install, backend report, GPU tests, GPU (and 16-core CPU)
# benchmarks. Stages: install info tests bench bitcheck tvbattery tprobe hostbudget benchsync
# benchcl cpubench sanitize soak probe multi tables ncu (default: install info tests bench).
# Example: bash scripts/gpu_check.sh install info tests
# Logs and JSON go to $RESULTS (default ./gpu-out), and after every stage into one archive,
# $OUT/gpu-check.tgz, when OUT is set: the device tool brings back at most 8 files from $OUT,
# and a call cut by its time limit still brings back the stages it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-$PWD/gpu-out}
mkdir -p "$RESULTS"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
stages=${*:-install info tests bench}
status=0
started=$SECONDS
# within SECONDS: SECONDS, or less where CALL_LIMIT (the call's own limit) leaves less, keeping
# 60 s for the archive and a SIGINT's grace (at least 1).
within() {
  local limit=$1
  if [ -n "${CALL_LIMIT:-}" ]; then
    local left=$((CALL_LIMIT - (SECONDS - started) - 60))
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  [ "$limit" -lt 1 ] && limit=1
  echo "$limit"
}
pack() {
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu-check.tgz.part" -C "$RESULTS" . &&
      mv "$OUT/gpu-check.tgz.part" "$OUT/gpu-check.tgz"
  fi
}

for stage in $stages; do
  echo "=== $stage"
  case $stage in
    install)
      "$PYTHON" -m pip install -q --no-deps --no-build-isolation \
        -e . -e backends/numba -e backends/triton -e backends/cupy 2>&1 | grep -v WARNING
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RESULTS/gpu.txt"
      ;;
    bitcheck)  # CuPy outputs, argmax and gradients bit for bit against an older tree (OLD_TREE)
      old=${OLD_TREE:-.gpu-old}
      "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e "$old" -e "$old/backends/cupy" \
        2>&1 | grep -v WARNING
      (cd /tmp && "$PYTHON" "$OLDPWD/backends/cupy/tools/bitcheck.py" save "$RESULTS/bits-old.json") \
        2>&1 | tail -3
      "$PYTHON" -m pip install -q --no-deps --no-build-isolation \
        -e . -e backends/numba -e backends/triton -e backends/cupy 2>&1 | grep -v WARNING
      "$PYTHON" backends/cupy/tools/bitcheck.py compare "$RESULTS/bits-old.json" 2>&1 \
        | tee "$RESULTS/bitcheck.txt" | tail -5
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    info)
      "$PYTHON" -m roi_ops info 2>&1 | tee "$RESULTS/info.txt"
      ;;
    tests)
      # Every NVRTC module compiled once into CuPy's cache first (not fatal: the workers would
      # compile what they need themselves), so that fourteen workers do not each compile them.
      timeout "$(within ${WARM_TIMEOUT:-150})" "$PYTHON" backends/cupy/tools/warm_kernels.py 2>&1 \
        | tee "$RESULTS/warm.log" | tail -2
      # SIGINT at the limit: pytest then stops as on Ctrl-C, printing the counts so far, the
      # slowest tests and the JUnit file, where SIGTERM leaves none of them.
      limit=$(within ${TEST_TIMEOUT:-420})
      timeout -s INT -k 30 "$limit" \
        "$PYTHON" -m pytest -q -rs --durations=15 -p no:cacheprovider ${PYTEST_ARGS:-tests} \
        --junitxml="$RESULTS/junit.xml" 2>&1 | tee "$RESULTS/tests.log" | tail -40
      rc=${PIPESTATUS[0]}
      if [ "$rc" -eq 124 ]; then
        echo "tests: stopped at their limit ($limit s); the counts are of the tests" \
          "run by then" | tee -a "$RESULTS/tests.log"
      fi
      [ "$rc" -eq 0 ] || status=1
      ;;
    tvbattery)  # the torchvision stage (oracle, RoIPool battery, drop-in patch) on this machine
      ROI_OPS_TV_PYTHON="$PYTHON" timeout ${TV_TIMEOUT:-300} bash scripts/test_torchvision.sh \
        -q -n ${TV_WORKERS:-8} 2>&1 | tee "$RESULTS/tvbattery.log" | tail -6
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    tprobe)  # Triton kernels against the previous ones (OLD_TREE) and torchvision
      old=${OLD_TREE:-.gpu-old}
      timeout ${TPROBE_TIMEOUT:-150} "$PYTHON" backends/triton/tools/probe.py kernels \
        --old "$old/backends/triton/roi_ops_triton" ${TPROBE_ARGS:-} 2>&1 \
        | tee "$RESULTS/tprobe.txt" | tail -40
      ;;
    hostbudget)  # where a small call's host time goes, step by step, beside torchvision's
      "$PYTHON" backends/cupy/tools/host_budget.py --budget ${HOST_BUDGET_S:-0.4} 2>&1 \
        | tee "$RESULTS/host-budget.txt"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    bench)
      "$PYTHON" -m roi_ops bench --device cuda --dtype float32 float16 bfloat16 \
        ${BENCH_ARGS:-} --json "$RESULTS/bench-cuda.json" 2>"$RESULTS/bench-progress.log" \
        | tee "$RESULTS/bench-cuda.txt"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    benchsync)  # the same, one synchronised call per sample (the latency of an isolated call)
      "$PYTHON" -m roi_ops bench --device cuda --dtype float32 float16 bfloat16 --sync \
        ${BENCH_ARGS:-} --json "$RESULTS/bench-cuda-sync.json" 2>>"$RESULTS/bench-progress.log" \
        | tee "$RESULTS/bench-cuda-sync.txt"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    benchcl)  # channels_last inputs (torchvision copies them to NCHW first)
      "$PYTHON" -m roi_ops bench --device cuda --dtype ${CL_DTYPES:-float32 float16 bfloat16} \
        --channels-last ${BENCH_ARGS:-} ${CL_ARGS:-} --json "$RESULTS/bench-cuda-cl.json" \
        2>>"$RESULTS/bench-progress.log" | tee "$RESULTS/bench-cuda-cl.txt"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    cpubench)
      for threads in ${CPU_THREADS:-16 1}; do
        "$PYTHON" -m roi_ops bench --device cpu --full-size --threads "$threads" \
          --backend numba torchvision --mode fwd fwd+bwd --min-reps 2 --budget 1 \
          ${CPU_BENCH_ARGS:-} --json "$RESULTS/bench-cpu-$threads.json" \
          2>>"$RESULTS/bench-progress.log" | tee "$RESULTS/bench-cpu-$threads.txt"
      done
      ;;
    sanitize)
      for tool in memcheck racecheck; do
        timeout 400 compute-sanitizer --tool "$tool" --error-exitcode 9 \
          "$PYTHON" backends/cupy/tools/sanitize.py --backend cupy cupy-planes cupy-planes-grouped \
          cupy-tables triton 2>&1 \
          | tee "$RESULTS/sanitize-$tool.log" | grep -E "SUMMARY|sanitize cases|Error" | tail -5
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      done
      ;;
    soak)
      timeout 500 "$PYTHON" scripts/soak.py --device cuda --backend cupy triton \
        --calls "${SOAK_CALLS:-10000}" --json "$RESULTS/soak-cuda.json" 2>&1 | tail -5
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    probe)
      timeout 500 "$PYTHON" backends/cupy/tools/probe.py --json "$RESULTS/probe.json" ${PROBE_ARGS:-} 2>&1 \
        | tee "$RESULTS/probe.log" | grep -v Warning
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    multi)  # the fused multi-level launches against level by level (tools/multi_probe.py)
      timeout ${MULTI_TIMEOUT:-300} "$PYTHON" backends/cupy/tools/multi_probe.py ${MULTI_ARGS:-} 2>&1 \
        | tee "$RESULTS/multi.txt" | grep -v Warning
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    tables)  # the inference through the tables of maxima, on and off (tools/table_probe.py)
      timeout ${TABLES_TIMEOUT:-400} "$PYTHON" backends/cupy/tools/table_probe.py ${TABLES_ARGS:-} 2>&1 \
        | tee "$RESULTS/tables.txt" | grep -v Warning
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      ;;
    ncu)
      for workload in ${NCU_WORKLOADS:-fpn-p4 big-batch}; do
        timeout 300 ncu --clock-control none -k regex:roi_pool --csv \
          --metrics "$(tr '\n' ',' < backends/cupy/tools/ncu_metrics.txt | sed 's/,$//')" \
          "$PYTHON" backends/cupy/tools/probe.py --ncu "$workload" ${NCU_PROBE_ARGS:-} \
          >"$RESULTS/ncu-$workload.csv" 2>&1
        "$PYTHON" backends/cupy/tools/ncu_summary.py "$RESULTS/ncu-$workload.csv" | tee "$RESULTS/ncu-$workload.txt"
      done
      ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
  pack
done
exit $status
