#!/usr/bin/env bash
# Record a benchmark run under benchmarks/results/<device>-<date>/ (one folder per run).
#
#   benchmarks/record.sh [--device cpu|cuda] [NOTE]   run the CLI (ops + e2e) and record it
#   benchmarks/record.sh --from OUTDIR [NOTE]         record the files of a gpu_check.sh run
#
# NOTE (free text, e.g. "quiet machine" or "shared machine, other builds running") goes
# into the folder's README.md next to the machine, versions, date, command and load average,
# so that nobody reads a number without knowing how it was made. Extra CLI options can be
# passed in FASTSAM_BENCH_ARGS (e.g. "--threads 1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

FROM=""
DEVICE=""
while [ $# -gt 0 ]; do
  case $1 in
    --from) FROM=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) break ;;
  esac
done
NOTE=${1:-"no note given"}

if [ -n "$FROM" ]; then
  [ -f "$FROM/bench.json" ] || { echo "record.sh: $FROM/bench.json not found" >&2; exit 2; }
  SOURCE_JSON="$FROM/bench.json"
else
  DEVICE=${DEVICE:-$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
  SOURCE_JSON=""
fi

slug() {  # slug JSON: folder name (device-date) of a saved run; slug -: of this machine, now
  "$PY" - "$1" "${DEVICE:-cpu}" <<'EOF'
import json, sys, torch
from fastsam.bench.env import environment, run_slug
source, device = sys.argv[1:]
env = json.load(open(source))["environment"] if source != "-" else environment(torch.device(device))
print(run_slug(env))
EOF
}

if [ -n "$FROM" ]; then NAME=$(slug "$SOURCE_JSON"); else NAME=$(slug -); fi
DIR=benchmarks/results/$NAME
n=2
while [ -e "$DIR" ]; do DIR=benchmarks/results/$NAME-$n; n=$((n + 1)); done
mkdir -p "$DIR"
LOAD_BEFORE=""
[ -z "$FROM" ] && LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "-")

if [ -n "$FROM" ]; then
  for f in summary.txt build.log gpu-tests.log bench.log bench.json bench.png e2e.json e2e.png; do
    [ -f "$FROM/$f" ] && cp "$FROM/$f" "$DIR/"
  done
  "$PY" -m fastsam.bench.report "$DIR/bench.json" --csv "$DIR/bench.csv" > "$DIR/bench.txt"
  [ -f "$DIR/e2e.json" ] && "$PY" -m fastsam.bench.report "$DIR/e2e.json" > "$DIR/e2e.txt"
  COMMANDS="benchmarks/gpu_check.sh OUTDIR; benchmarks/record.sh --from OUTDIR"
else
  # shellcheck disable=SC2086
  "$PY" -m fastsam.bench --device "$DEVICE" --peers ${FASTSAM_BENCH_ARGS:-} --json "$DIR/bench.json" --csv "$DIR/bench.csv" \
    --plot "$DIR/bench.png" > "$DIR/bench.txt"
  # the e2e stage takes the shared options (--threads, --quick, ...) but not the ops mode's own
  E2E_ARGS=()
  # shellcheck disable=SC2206
  ARGS=(${FASTSAM_BENCH_ARGS:-})
  i=0
  while [ $i -lt ${#ARGS[@]} ]; do
    case ${ARGS[$i]} in
      --full|--full-step|--peers|--workloads=*|--items=*) ;;
      --workloads|--items) i=$((i + 1)) ;;
      *) E2E_ARGS+=("${ARGS[$i]}") ;;
    esac
    i=$((i + 1))
  done
  "$PY" -m fastsam.bench --e2e --device "$DEVICE" ${E2E_ARGS[@]+"${E2E_ARGS[@]}"} --json "$DIR/e2e.json" \
    --plot "$DIR/e2e.png" > "$DIR/e2e.txt"
  COMMANDS="benchmarks/record.sh --device $DEVICE \"$NOTE\"${FASTSAM_BENCH_ARGS:+ (FASTSAM_BENCH_ARGS=\"$FASTSAM_BENCH_ARGS\")}"
fi
LOAD_AFTER=""
[ -z "$FROM" ] && LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "-")

"$PY" - "$DIR" "$NOTE" "$COMMANDS" "$LOAD_BEFORE" "$LOAD_AFTER" <<'EOF'
import json, os, sys
folder, note, commands, load_before, load_after = sys.argv[1:]
r = json.load(open(os.path.join(folder, "bench.json")))
env = r["environment"]
lines = [f"# {os.path.basename(folder)}", "",
         f"* device: {env['device_name']}" + (f", driver {env['driver']}" if env.get("driver") else ""),
         f"* machine: {env['cpu']}, {env['cpu_count']} CPUs, torch threads {env['torch_threads']}; {env['platform']}",
         f"* versions: torch {env['torch']} (CUDA build {env.get('torch_cuda')}), triton {env.get('triton')}, "
         f"python {env['python']}, fastsam {env['fastsam']} at {env.get('git_commit')}",
         f"* date: {env['date']}",
         f"* load average (1/5/15 min), from bench.json: {env.get('load_average')} at its start, "
         f"{env.get('load_average_end')} at its end"
         + (f"; {load_before} before and {load_after} after the whole recording (ops + e2e)" if load_before else ""),
         f"* note: {note}",
         f"* made with: `{commands}`", "",
         "Files: bench.txt (tables), bench.json, bench.csv, bench.png; e2e.txt, e2e.json, e2e.png "
         "(end-to-end training steps), where present. Bandwidth is % of the copy bandwidth measured in the same run.",
         ""]
open(os.path.join(folder, "README.md"), "w").write("\n".join(lines))
EOF
echo "recorded in $DIR:"; ls "$DIR"
