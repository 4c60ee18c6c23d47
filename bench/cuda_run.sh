#!/bin/bash
# On the GPU machine, from the repo root, after .device/b/device-b.sh was sourced:
#   bash bench/cuda_run.sh test    -> GPU pytest output in $OUT/cuda_tests_h100.txt
#   bash bench/cuda_run.sh bench   -> $OUT/cuda_h100.json/.png, bench CLI output
set -o pipefail
export PYTHONUNBUFFERED=1
mode=${1:-test}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
if [ "$mode" = test ]; then
  timeout ${TEST_TIMEOUT:-420} python3 -m pytest -p no:cacheprovider -rA -q tests/test_cuda.py ${EXTRA_TESTS} 2>&1 | tee $OUT/cuda_tests_h100.txt | grep -v "^PASSED\|^SKIPPED" | tail -60
else
  python3 bench/cuda_bench.py --out $OUT ${BENCH_ARGS} 2>&1 | tee $OUT/cuda_bench_log.txt | tail -80
fi
