#!/bin/bash
# Last GPU call of the session: the seven families patched on CUDA (test_patched_on_cuda) and the
# kernel benchmark against fla with GPU time per call (bf16, Qwen3.5 layer, B in {1, 4}, T in {1, 8192}).
set -o pipefail
export PYTHONUNBUFFERED=1
for f in qwen3_5 qwen3_5_moe qwen3_next kimi_linear kimi_k3 bailing_moe_v3 olmo_hybrid; do
  timeout 200 python3 -m pytest -p no:cacheprovider -q -rfE "tests/test_families.py::test_patched_on_cuda[$f]" > /tmp/fam_$f.log 2>&1 &
done; wait
cat /tmp/fam_*.log > $OUT/families_cuda_h200.txt; grep -hE "^(FAILED|ERROR)|passed|failed" /tmp/fam_*.log
timeout 170 python3 -m mlx_gdn.bench --gpu-time --no-progress --commit ${GDN_COMMIT:-unknown} --dtype bfloat16 \
  --batch 1,4 --tokens 1,8192 --budget 0.3 --max-reps 60 --sets 2 --copy-mib 256 \
  --only "^mlx-gdn.cuda.*fused" --only "^fla" --json $OUT/bench_h200.json --md $OUT/bench_h200.md 2>&1 | tail -24
