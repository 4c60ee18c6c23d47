#!/bin/bash
# The GPU runs behind the recorded H200 results, in two parts that each fit one 10-minute call:
#   bash bench/h200_session.sh check    GPU tests (every test marked cuda, plus the ops paths on the
#                                       GPU), doctor, python -m mlx_gdn.bench --gpu-time against fla
#   bash bench/h200_session.sh extra    training (forward+backward against fla), serving against fla,
#                                       per-key chunked against recurrent, a whole 9B-shaped model, tune
# Run from the repo root after .device/b/device-b.sh (and, for fla's backward, .device/d/device-d.sh)
# was sourced. Results land in $OUT; GDN_COMMIT names the commit being measured.
set -o pipefail
export PYTHONUNBUFFERED=1
C=${GDN_COMMIT:-unknown}
B="python3 -m mlx_gdn.bench --gpu-time --no-progress --commit $C --max-call 3 --only ^mlx-gdn.cuda.*fused --only ^fla --only mlx-lm.default"
if [ "$1" = check ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -m pytest -p no:cacheprovider --collect-only -q tests -m cuda 2>/dev/null | grep "::" > /tmp/ids.txt
  ls tests/test_chunked.py tests/test_denormals.py tests/test_ops_recurrent.py >> /tmp/ids.txt
  echo "$(wc -l < /tmp/ids.txt) GPU test ids"
  rm -f /tmp/shard_*; split -n r/14 -d /tmp/ids.txt /tmp/shard_
  for f in /tmp/shard_??; do timeout 270 python3 -m pytest -p no:cacheprovider -rfE -q $(cat $f) > $f.log 2>&1 & done; wait
  cat /tmp/shard_*.log > $OUT/cuda_tests_h200.txt
  grep -hE "^(FAILED|ERROR)|passed|failed|error" /tmp/shard_*.log | tail -30
  timeout 60 python3 -m mlx_gdn.doctor --quick --json $OUT/doctor_h200.json 2>&1 | tail -8
  timeout 120 $B --batch 1,16,64 --tokens 1 --json $OUT/bench_decode_h200.json 2>&1 | tail -30
  timeout 150 $B --batch 1 --tokens 2048,8192,32768 --json $OUT/bench_prefill_b1_h200.json 2>&1 | tail -30
  timeout 80 $B --batch 4 --tokens 8192 --json $OUT/bench_prefill_b4_h200.json 2>&1 | tail -14
elif [ "$1" = extra ]; then
  timeout 170 python3 bench/train_bench.py --no-mlx-lm --budget 2 --out $OUT/train_h200.json 2>&1 | tail -16
  timeout 110 python3 -m mlx_gdn.bench --serving --commit $C --json $OUT/serving_h200.json 2>&1 | tail -22
  timeout 60 python3 bench/per_key_chunked_bench.py --backend cuda --budget 1 --out $OUT/per_key_chunked_h200.json 2>&1 | tail -10
  timeout 190 python3 bench/model_bench.py --skip-unpatched-prefill --decode 48 --commit $C --json $OUT/model_h200.json 2>&1 | tail -24
  timeout 50 python3 -m mlx_gdn.tune --quick --output $OUT/tune_h200.json 2>&1 | tail -6
fi
