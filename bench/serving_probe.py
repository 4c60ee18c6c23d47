"""Where a pooled decode step's time went (CUPTI kernel list), B=64, S in (64, 1024): the probe behind
bench/serving_probe_h200.json. `python -m mlx_gdn.bench --serving --gpu-time` now reports the same split."""
import json, sys, time
import numpy as np
import mlx.core as mx
sys.path.insert(0, ".")
import mlx_gdn
from mlx_gdn.bench.gpu_time import kernel_times
from mlx_gdn.testing import random_inputs

out = {}
B, Hk, Hv, D = 64, 16, 32, 128
x = random_inputs(B, 1, Hk, Hv, D, D, dtype=mx.bfloat16, seed=0, with_state=False)
rng = np.random.default_rng(0)
def upd(state, **kw):
    return mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, state, **kw)
for S in (64, 1024):
    idx = mx.array(rng.permutation(S)[:B].astype(np.int32))
    holder = {"pool": mx.zeros((S, Hv, D, D), mx.float32)}
    mx.eval(holder["pool"])
    def pooled():
        y, holder["pool"] = upd(holder["pool"], state_indices=idx, check_values=False)
        mx.eval(y, holder["pool"])
        return None
    st = mx.zeros((B, Hv, D, D), mx.float32); mx.eval(st)
    def plain():
        y, s = upd(st)
        mx.eval(y, s)
        return None
    for name, f in (("pooled", pooled), ("plain", plain)):
        for _ in range(5): f()
        t = time.perf_counter(); n = 30
        for _ in range(n): f()
        mx.synchronize(); wall = (time.perf_counter() - t) / n * 1e3
        kt = kernel_times([f], lambda o: mx.synchronize(), reps=20)
        out[f"{name} S={S}"] = dict(wall_ms=wall, **kt)
        print(name, S, f"wall {wall:.3f} ms gpu {kt['gpu_us']:.1f} us launches {kt['launches']}")
        for k, v in sorted(kt["kernels"].items(), key=lambda kv: -kv[1])[:8]:
            print(f"   {v:9.1f} us  {k[:100]}")
import os
json.dump(out, open(os.environ.get("OUT", ".") + "/serving_probe.json", "w"), indent=1)
