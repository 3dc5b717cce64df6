#!/usr/bin/env bash
# Session 3 GPU call: the one-shot check (build, every GPU test, bench, e2e), then an A/B of
# the CUDA launcher on the SAM/GSAM sub-steps: 4 KiB vs 32 KiB launch arguments, chunk sizes.
# Everything lands in gpu_check's 8 files (the sweep is appended to bench.log).
set -u
OUT=$1
cd "$(dirname "$0")/.."
START=$(date +%s)
FASTSAM_GPU_CHECK_BUDGET=${CHECK_BUDGET:-440} FASTSAM_GPU_TESTS_LIMIT=${TESTS_LIMIT:-250} bash benchmarks/gpu_check.sh "$OUT"
echo "gpu_check rc=$? after $(( $(date +%s) - START )) s"
export PYTHONUNBUFFERED=1
{
  for cfg in "0 16384" "1 16384" "1 8192" "1 32768"; do
    set -- $cfg
    echo "== [$(( $(date +%s) - START )) s] sweep FASTSAM_CUDA_LARGE_PARAMS=$1 FASTSAM_CUDA_CHUNK_SIZE=$2"
    FASTSAM_CUDA_LARGE_PARAMS=$1 FASTSAM_CUDA_CHUNK_SIZE=$2 timeout 30 python3 -m fastsam.bench --device cuda \
      --backends triton,cuda --workloads resnet50,vit_b16,tiny --items sam_substep,gsam_substep --quiet 2>&1 |
      grep -A7 "^SAM sub-step\|^GSAM sub-step\|copy bandwidth"
  done
  for large in 0 1; do
    echo "== [$(( $(date +%s) - START )) s] host FASTSAM_CUDA_LARGE_PARAMS=$large"
    FASTSAM_CUDA_LARGE_PARAMS=$large timeout 25 python3 benchmarks/host_overhead.py --workloads resnet50,tiny --backends cuda --calls 30
  done
  echo "== [$(( $(date +%s) - START )) s] done"
} 2>&1 | tee -a "$OUT/bench.log"
