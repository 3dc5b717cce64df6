#!/usr/bin/env bash
# One-shot GPU check: everything a lent GPU should do for fastsam, in one run of < 8 minutes.
#
#   benchmarks/gpu_check.sh OUTDIR            on a CUDA machine (offline is fine)
#   FASTSAM_GIT_COMMIT=<sha> ... OUTDIR       where the copy's .git may not match the files
#                                             (the lent machines' was stale): the results
#                                             then name that commit
#   benchmarks/gpu_check.sh --dry-run OUTDIR  anywhere: the CPU-side steps only (see below)
#
# Stages (each one runs even if an earlier one failed; its status is recorded):
#   1. env    machine, driver, versions                               -> build.log
#   2. build  the compiled extension in place, offline:
#             pip install --no-build-isolation --no-deps --no-index -e .   -> build.log
#   3. tests  every GPU-marked test: python -m pytest -m gpu tests    -> gpu-tests.log
#   4. bench  python -m fastsam.bench --device cuda --peers --full-step (ops, the variants' items,
#             host items, peers, full SAM steps unfused vs fused)  -> bench.log, bench.json, bench.png
#             (every item, so also the host-time items optimizer_substep and kernels_substep,
#             and the peer baselines on the SAM and GSAM sub-steps)
#   5. e2e    python -m fastsam.bench --e2e --device cuda (with the cheap variants)  -> bench.log, e2e.json, e2e.png
# then a summary table, printed last and kept in summary.txt. OUTDIR ends up with at most
# 8 files, no folders: summary.txt build.log gpu-tests.log bench.log bench.json bench.png
# e2e.json e2e.png (the device tool brings back at most 8 files). CSV rows can be made
# from the JSON afterwards: python -m fastsam.bench.report OUTDIR/bench.json --csv FILE.
#
# Each stage has a time limit, and all of them share a budget of FASTSAM_GPU_CHECK_BUDGET
# seconds (default 440), so the whole run stays under 8 minutes; a stage that reaches its
# limit gets SIGINT (pytest and fastsam-bench then report and save what they have). The GPU
# tests get at most FASTSAM_GPU_TESTS_LIMIT seconds (default 200) of that budget.
#
# --dry-run: runs the same script on the CPU to exercise it: the build command is shown,
# not run (an in-place build would write into a shared checkout), the GPU tests are only
# collected, and bench and e2e run on the CPU in quick mode on tiny inputs.
# Without --dry-run on a machine without CUDA, the GPU stages report "no CUDA".
set -u -o pipefail

usage() { echo "usage: $0 [--dry-run] OUTDIR" >&2; exit 2; }
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
[ $# -eq 1 ] || usage
OUT=$1
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}  # on the lent GPU machines, python3 is the interpreter that holds torch
command -v "$PY" >/dev/null 2>&1 || PY=python

BUDGET=${FASTSAM_GPU_CHECK_BUDGET:-440}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
SUMMARY=()  # "stage|status|seconds|detail"

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage_limit CAP RESERVE: seconds for a stage: at most CAP, leaving RESERVE for later stages.
stage_limit() {
  local left=$(( $(remaining) - $2 ))
  [ "$left" -gt "$1" ] && left=$1
  [ "$left" -lt 10 ] && left=10
  echo "$left"
}

# run_limited SECONDS LOGFILE CMD...: run CMD with a time limit (SIGINT, then SIGKILL 10 s
# later), output appended to LOGFILE and echoed; returns CMD's status (124 on timeout).
run_limited() {
  local limit=$1 log=$2; shift 2
  echo "+ $* (limit ${limit}s)" | tee -a "$log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

record() { SUMMARY+=("$1|$2|$3|$4"); }

status_of() {  # status_of RC -> ok / TIMEOUT / FAILED (rc N)
  case $1 in
    0) echo ok ;;
    124|137) echo TIMEOUT ;;
    *) echo "FAILED (rc $1)" ;;
  esac
}

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# -- 1. env --------------------------------------------------------------------------------
t0=$(date +%s)
{
  echo "== fastsam GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), dry run: $DRY_RUN"
  echo "== git: $(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo '-') $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo '(with uncommitted changes)')${FASTSAM_GIT_COMMIT:+; FASTSAM_GIT_COMMIT=$FASTSAM_GIT_COMMIT (what the caller says ran)}"
  echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi not available"
  echo "== nvcc"; (command -v nvcc >/dev/null && nvcc --version) || ls -d /usr/local/cuda* 2>&1 || echo "nvcc not found"
  echo "== python"; "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, platform, os, torch
print("python", platform.python_version(), "|", platform.platform(), "|", os.cpu_count(), "CPUs")
print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| capability %d.%d" % (p.major, p.minor), "| %.1f GiB" % (p.total_memory / 2**30))
for name in ("triton", "ninja", "pybind11", "pytest", "pytest-benchmark", "matplotlib", "numpy", "setuptools", "pip"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
} > "$OUT/build.log" 2>&1
cat "$OUT/build.log"
DEVICE_LINE=$(grep -m1 '^device ' "$OUT/build.log" || echo "no CUDA device")
record env ok $(( $(date +%s) - t0 )) "${DEVICE_LINE#device }"

# -- 2. build ------------------------------------------------------------------------------
t0=$(date +%s)
BUILD_CMD=("$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .)
if [ "$DRY_RUN" = 1 ]; then
  echo "== build (dry run): would run, in $REPO: FASTSAM_REQUIRE_CUDA=1 TORCH_CUDA_ARCH_LIST=<this GPU> MAX_JOBS=$(nproc) ${BUILD_CMD[*]}" | tee -a "$OUT/build.log"
  record build skipped 0 "dry run: command shown in build.log"
elif [ "$HAS_CUDA" != 1 ]; then
  echo "== build: no CUDA here; nothing built" | tee -a "$OUT/build.log"
  record build "no CUDA" 0 "torch sees no CUDA device"
else
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH} MAX_JOBS=${MAX_JOBS:-$(nproc)} FASTSAM_REQUIRE_CUDA=1
  echo "== build: CUDA_HOME=${CUDA_HOME:-auto} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" | tee -a "$OUT/build.log"
  run_limited "$(stage_limit 180 270)" "$OUT/build.log" "${BUILD_CMD[@]}"
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ]; then
    echo "== pip failed (rc $rc); trying setup.py build_ext --inplace" | tee -a "$OUT/build.log"
    run_limited "$(stage_limit 150 270)" "$OUT/build.log" "$PY" setup.py build_ext --inplace
    rc=$?
    [ $rc -eq 0 ] && BUILD_NOTE="pip failed; built with setup.py build_ext --inplace" || BUILD_NOTE=""
  else
    BUILD_NOTE=""
  fi
  # The build is only good if the compiled backends load here.
  BACKENDS=$("$PY" -c "import torch, fastsam; print(','.join(fastsam.available_backends('cuda')))" 2>>"$OUT/build.log")
  echo "== cuda backends available: ${BACKENDS:-none}" | tee -a "$OUT/build.log"
  if [ $rc -eq 0 ] && [[ ",$BACKENDS," != *",cuda,"* ]]; then rc=1; BUILD_NOTE="built, but the cuda backend is unavailable"; fi
  # A C++ error must come back as a Python error (a statically linked libstdc++ of another
  # version made every TORCH_CHECK message segfault on these machines once; setup.py).
  ERR=$("$PY" -c "import torch, fastsam.ops.compiled as c; c.load_extension()
try:
    torch.ops.fastsam.restore_([torch.zeros(3)], [torch.zeros(4)])
except RuntimeError as e:
    print('ok' if 'has shape' in str(e) else 'wrong message: ' + str(e)[:200])" 2>&1 | tail -1)
  echo "== C++ error path: ${ERR:-crashed}" | tee -a "$OUT/build.log"
  if [ $rc -eq 0 ] && [ "$ERR" != ok ]; then rc=1; BUILD_NOTE="C++ errors do not reach Python: ${ERR:-the process crashed}"; fi
  record build "$(status_of $rc)" $(( $(date +%s) - t0 )) "${BUILD_NOTE:-cuda backends: ${BACKENDS:-none}}"
fi

# -- 3. GPU tests --------------------------------------------------------------------------
t0=$(date +%s)
: > "$OUT/gpu-tests.log"
export FASTSAM_EXPECT_BACKENDS_CUDA=${FASTSAM_EXPECT_BACKENDS_CUDA:-cuda,triton}
# tests/test_experiments.py has no GPU case and imports mnist1d, which the GPU image lacks
GPU_TEST_ARGS=(-m gpu tests --ignore=tests/test_experiments.py -p no:cacheprovider)
# Triton compiles each kernel variant on first use (~1 s each, one at a time per process):
# spread the tests over 8 processes where pytest-xdist is installed (the GPU image has it;
# 16 CPUs there).
if [ "$DRY_RUN" != 1 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
  GPU_TEST_ARGS+=(-n 8)
fi
if [ "$DRY_RUN" = 1 ]; then
  run_limited "$(stage_limit 120 120)" "$OUT/gpu-tests.log" "$PY" -m pytest "${GPU_TEST_ARGS[@]}" --collect-only -q
  rc=$?
  # pytest exits 5 when nothing was collected: on a machine without CUDA, the gpu cases exist but are skipped.
  record tests "$(status_of $rc) (collect only)" $(( $(date +%s) - t0 )) "$(grep -E 'collected|selected|error' "$OUT/gpu-tests.log" | tail -1)"
else
  run_limited "$(stage_limit "${FASTSAM_GPU_TESTS_LIMIT:-200}" 110)" "$OUT/gpu-tests.log" "$PY" -m pytest "${GPU_TEST_ARGS[@]}" -q -rfEs --durations=10
  rc=$?
  detail=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/gpu-tests.log" | tail -1 | tr -d '=' | sed 's/^ *//')
  if [ "$HAS_CUDA" != 1 ]; then
    record tests "no CUDA" $(( $(date +%s) - t0 )) "$detail"
  elif [ $rc -eq 5 ]; then
    record tests "FAILED (no test ran)" $(( $(date +%s) - t0 )) "$detail"
  else
    record tests "$(status_of $rc)" $(( $(date +%s) - t0 )) "$detail"
  fi
fi

# -- 4. bench and 5. e2e ---------------------------------------------------------------------
: > "$OUT/bench.log"
if [ "$DRY_RUN" = 1 ]; then
  BENCH_ARGS=(--device cpu --quick --workloads mini --threads 1 --peers --full-step)
  E2E_ARGS=(--device cpu --quick --threads 1)
elif [ "$HAS_CUDA" = 1 ]; then
  BENCH_ARGS=(--device cuda --peers --full-step)
  E2E_ARGS=(--device cuda)
fi
PLOT=1
"$PY" -c "import matplotlib" >/dev/null 2>&1 || PLOT=0
for stage in bench e2e; do
  t0=$(date +%s)
  PLOT_ARGS=()
  [ "$PLOT" = 1 ] && PLOT_ARGS=(--plot "$OUT/$stage.png")
  if [ "$DRY_RUN" != 1 ] && [ "$HAS_CUDA" != 1 ]; then
    record $stage "no CUDA" 0 "torch sees no CUDA device"
    continue
  fi
  if [ $stage = bench ]; then
    run_limited "$(stage_limit 150 75)" "$OUT/bench.log" "$PY" -m fastsam.bench "${BENCH_ARGS[@]}" \
      --json "$OUT/bench.json" "${PLOT_ARGS[@]}"
  else
    run_limited "$(stage_limit 90 5)" "$OUT/bench.log" "$PY" -m fastsam.bench --e2e "${E2E_ARGS[@]}" \
      --json "$OUT/e2e.json" "${PLOT_ARGS[@]}"
  fi
  rc=$?
  json="$OUT/$stage.json"
  if [ -f "$json" ]; then
    detail=$("$PY" - "$json" <<'EOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
rows = r["results"]
bad = sum(1 for x in rows if x.get("error"))
part = " (partial)" if any(n.startswith("INTERRUPTED") for n in r.get("notes", [])) else ""
print(f"{len(rows)} rows, {bad} failed{part}; backends {','.join(r['settings']['backends'])}")
EOF
)
  else
    detail="no $stage.json written"
  fi
  [ "$PLOT" = 1 ] || detail="$detail; no plot (matplotlib missing)"
  record $stage "$(status_of $rc)" $(( $(date +%s) - t0 )) "$detail"
done

# -- summary (printed last) -----------------------------------------------------------------
{
  echo "== fastsam GPU check summary ($(( $(date +%s) - START )) s total; dry run: $DRY_RUN)"
  printf '%-6s  %-24s  %6s  %s\n' stage status seconds detail
  printf '%-6s  %-24s  %6s  %s\n' ------ ------------------------ ------- ------
  for line in "${SUMMARY[@]}"; do
    IFS='|' read -r s st sec det <<< "$line"
    printf '%-6s  %-24s  %6s  %s\n' "$s" "$st" "$sec" "$det"
  done
  for f in bench e2e; do
    if [ -f "$OUT/$f.json" ]; then
      echo
      "$PY" -m fastsam.bench.report --brief "$OUT/$f.json" 2>&1
    fi
  done
  echo
  echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"

for line in "${SUMMARY[@]}"; do
  IFS='|' read -r s st sec det <<< "$line"
  case $st in ok|skipped|ok*collect*) ;; *) exit 1 ;; esac
done
exit 0
