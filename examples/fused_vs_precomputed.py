"""Fused gating vs precomputed gates: the same result both ways, and what each costs here."""

import argparse
import statistics
import time

import mlx.core as mx

import mlx_gdn
from mlx_gdn import reference
from mlx_gdn.testing import tolerance

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=64)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
args = ap.parse_args()

B, T, Hk, Hv, Dk, Dv = args.batch, args.tokens, 16, 32, 128, 128
dt = getattr(mx, args.dtype)
q, k = mlx_gdn.normalize_qk(mx.random.normal((B, T, Hk, Dk)).astype(dt), mx.random.normal((B, T, Hk, Dk)).astype(dt))
v = mx.random.normal((B, T, Hv, Dv)).astype(dt)
a, b = (mx.random.normal((B, T, Hv)).astype(dt) for _ in range(2))
A_log, dt_bias = mx.log(mx.linspace(1.0, 16.0, Hv)), 0.1 * mx.random.normal((Hv,))
state = 0.1 * mx.random.normal((B, Hv, Dv, Dk))


def fused():
    return mlx_gdn.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)


def precomputed():
    # The model computes the gates itself (e.g. to reuse them), then calls the rule.
    g, beta = mlx_gdn.compute_gates(a, b, A_log, dt_bias)
    return mlx_gdn.gated_delta_rule(q, k, v, g, beta, state)


def median_ms(fn):
    mx.eval(fn())  # warm-up: compilation and allocation
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


(y1, s1), (y2, s2) = fused(), precomputed()
diff = max(reference.rel_error(y1, y2), reference.rel_error(s1, s2))
g_ref, beta_ref = reference.gates(a, b, A_log, dt_bias)
y_ref, s_ref = reference.delta_rule(q, k, v, g_ref, beta_ref, state)
tol = tolerance(dt)
errs = [reference.rel_error(y, y_ref) for y in (y1, y2)] + [reference.rel_error(s, s_ref) for s in (s1, s2)]
print(f"device {mx.default_device()}, B={B} T={T} {args.dtype}, backends {mlx_gdn.available_backends()}")
print(f"fused vs precomputed: relative difference {diff:.2e}; vs float64 reference: max {max(errs):.2e}")
print(f"fused       {median_ms(fused):9.3f} ms per call (median of {args.reps})")
print(f"precomputed {median_ms(precomputed):9.3f} ms per call (median of {args.reps}, gates included)")
ok = diff < tol and max(errs) < tol
print("CHECK", "ok" if ok else "FAILED")
raise SystemExit(0 if ok else 1)
