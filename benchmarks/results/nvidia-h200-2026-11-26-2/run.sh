#!/usr/bin/env bash
# second GPU call of session 2: rebuilt CUDA kernels (slot search, chunk 16384), segfault diagnosis
# (it ran as .gpu2/run.sh in the repository root: the cd below goes to the root from there)
set -u
OUT=$1
BUDGET=${BUDGET:-360}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTSAM_REQUIRE_CUDA=1
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
lim() { local l=$(( $(left) - $2 )); [ $l -gt $1 ] && l=$1; [ $l -lt 5 ] && l=5; echo $l; }
el() { echo "== [$(( $(date +%s) - START )) s] $*"; }
{ el build; git rev-parse --short HEAD; timeout 150 python3 -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -3
  python3 -c "import torch, fastsam; print(fastsam.available_backends('cuda'), torch.__version__)"; } > $OUT/build.log 2>&1
cat > /tmp/repro.py <<'PY'
import sys, torch
from fastsam import ops
dev, case = sys.argv[1], sys.argv[2]
b = ops.get_backend("cpp" if dev == "cpu" else "cuda", dev)
try:
    if case == "overlap":
        b.accumulate_([torch.zeros(1, 3, device=dev).expand(4, 3)], [torch.ones(4, 3, device=dev)], 1.0)
    elif case == "shape":
        b.restore_([torch.zeros(3, device=dev)], [torch.zeros(4, device=dev)])
    else:
        torch.ops.fastsam.accumulate_([torch.zeros(1, 3, device=dev).expand(4, 3)], [torch.ones(4, 3, device=dev)], 1.0, False)
except RuntimeError as e:
    print(dev, case, "raised:", str(e).splitlines()[0])
PY
{ for dev in cpu cuda; do for case in overlap shape ops; do
    timeout 20 python3 -X faulthandler /tmp/repro.py $dev $case 2>&1 | grep -v "^  File\|^Thread\|^Current\|^$" | tail -4; echo "$dev $case rc=${PIPESTATUS[0]}"; done; done
  el cuda-gdb; timeout $(lim 45 260) cuda-gdb -q -batch -ex run -ex bt --args python3 /tmp/repro.py cuda overlap 2>&1 | grep -v "^\[New Thread\|^\[Thread\|^\[Detaching" | tail -45
} > $OUT/diag.log 2>&1
el tests > $OUT/gpu-tests.log
FASTSAM_EXPECT_BACKENDS_CUDA=cuda,triton timeout --signal=INT $(lim 170 120) python3 -m pytest -m gpu tests --ignore=tests/test_experiments.py \
  -p no:cacheprovider -q -rfEs -n 8 --durations=8 >> $OUT/gpu-tests.log 2>&1; echo "rc=$?" >> $OUT/gpu-tests.log
{ el bench; timeout --signal=INT $(lim 80 40) python3 -m fastsam.bench --device cuda --json $OUT/bench.json --plot $OUT/bench.png --quiet
  for c in 65536 32768 8192; do el "sweep FASTSAM_CUDA_CHUNK_SIZE=$c"
    FASTSAM_CUDA_CHUNK_SIZE=$c timeout $(lim 25 12) python3 -m fastsam.bench --device cuda --backends cuda --workloads resnet50,vit_b16,gpt2,tiny --items sam_substep,gsam_substep --quiet 2>&1 | grep -A8 "^SAM sub-step\|^GSAM sub-step\|copy bandwidth"; done
  el host; timeout $(lim 25 0) python3 benchmarks/host_overhead.py --workloads resnet50 --calls 30; el done
} > $OUT/bench.log 2>&1
tail -3 $OUT/gpu-tests.log; grep -E "raised|rc=" $OUT/diag.log; grep -A8 "^SAM sub-step" $OUT/bench.log | head -40
