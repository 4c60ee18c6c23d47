#!/bin/bash
# On the GPU machine, from the repo root, after .device/b/device-b.sh was sourced:
#   bash bench/cuda_run.sh test    -> GPU pytest output in $OUT/cuda_tests.txt (shard logs stay in /tmp: at most 8 files come back)
#   bash bench/cuda_run.sh bench   -> $OUT/cuda_bench.{json,png,md} and the log: python -m mlx_gdn.bench --gpu-time
#                                     (BENCH_ARGS adds arguments, e.g. --batch 1,4 --tokens 1,2048,8192)
# The GPU tests spend most of their time compiling kernel variants (NVRTC, one CPU core each),
# so they run as SHARDS parallel pytest processes over disjoint test ids.
set -o pipefail
export PYTHONUNBUFFERED=1
mode=${1:-test}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
if [ "$mode" = test ]; then
  files=${TEST_FILES:-tests/test_cuda.py tests/test_decode_layer.py}
  shards=${SHARDS:-8}
  python3 -m pytest -p no:cacheprovider --collect-only -q $files -k "${TEST_K:-cuda or gpu or Cuda}" 2>/dev/null \
    | grep "::" > /tmp/test_ids.txt
  echo "$(wc -l < /tmp/test_ids.txt) GPU test ids in $shards shards"
  rm -f /tmp/shard_*; split -n r/$shards -d /tmp/test_ids.txt /tmp/shard_
  for f in /tmp/shard_??; do
    timeout ${TEST_TIMEOUT:-420} python3 -m pytest -p no:cacheprovider -rA -q $(cat $f) > $f.log 2>&1 &
  done
  wait
  cat /tmp/shard_*.log > $OUT/cuda_tests.txt
  grep -hE "^(FAILED|ERROR)|passed|failed|error" /tmp/shard_*.log | tail -40
else
  # the benchmark CLI with fla in the same run and GPU time per kernel (CUPTI through torch)
  python3 -m mlx_gdn.bench --gpu-time --json $OUT/cuda_bench.json --plot $OUT/cuda_bench.png --md $OUT/cuda_bench.md \
    --commit "${GDN_COMMIT:-unknown}" --no-progress ${BENCH_ARGS} 2>&1 | tee $OUT/cuda_bench_log.txt | tail -80
fi
