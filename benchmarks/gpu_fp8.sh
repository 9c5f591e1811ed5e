#!/usr/bin/env bash
# The GPU session's one device call (an H100/H200 with no network; about 4-5 minutes):
#   bash benchmarks/gpu_fp8.sh
# 1. installs the project without build isolation (nothing can be downloaded there; setuptools is installed),
# 2. runs the CUDA cases of the FP8 device tests (torch._scaled_mm vs the CPU emulation, Trainer O1/O2,
#    torch.compile as one graph),
# 3. runs benchmarks/gpu_fp8.py (GEMM throughput, ~1B GPT step eager and compiled, peak memory),
# 4. runs benchmarks/fp8_sharded.py on one GPU: a ModelParallelStrategy (FSDP2, NCCL) O3 step next to bf16-mixed
#    (per-rank bytes/param, all-gather bytes; the 2-rank CPU run is in benchmarks/results/fp8_sharded.md).
# Logs and results go to $OUT (the device tool's folder), else benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import sys, torch, lightning; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__)"
} 2>&1 | tee "$out/gpu_env.txt"

if ! "$py" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . 2>&1 | tee -a "$out/gpu_env.txt"; then
  echo "pip install failed: using PYTHONPATH=$PWD" | tee -a "$out/gpu_env.txt"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# the CUDA cases (the compiled-block check in O2's mode only: the benchmark counts graph breaks in both)
timeout 150 "$py" -m pytest -q -p no:cacheprovider -k "cuda and not dequantized" \
  tests/fp8/test_fp8_device.py tests/fp8/test_fp8_compile.py tests/precision/test_msamp_device.py 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

"$py" benchmarks/gpu_fp8.py --budget-s 150 --out-dir "$out" 2>&1 | tee "$out/gpu_fp8.log"
bench_rc=${PIPESTATUS[0]}

timeout 120 "$py" benchmarks/fp8_sharded.py --accelerator cuda --devices 1 --modes "bf16-mixed,fp8-msamp O3" \
  --d-model 1024 --layers 4 --out "$out" 2>&1 | tee "$out/gpu_fp8_sharded.log"
sharded_rc=${PIPESTATUS[0]}

echo "gpu_fp8.sh: tests exit $tests_rc, benchmark exit $bench_rc, sharded O3 exit $sharded_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$sharded_rc" -eq 0 ]
