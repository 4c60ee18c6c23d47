"""Quickstart: one Gated DeltaNet call on random inputs, checked against the float64 reference."""

import argparse

import mlx.core as mx

import mlx_gdn
from mlx_gdn import reference
from mlx_gdn.testing import tolerance

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=64)
args = ap.parse_args()

# A Qwen3.5 linear-attention layer: 16 key heads, 32 value heads, head dims 128.
B, T, Hk, Hv, Dk, Dv = 1, args.tokens, 16, 32, 128, 128
q = mx.random.normal((B, T, Hk, Dk))
k = mx.random.normal((B, T, Hk, Dk))
v = mx.random.normal((B, T, Hv, Dv))
a, b = mx.random.normal((B, T, Hv)), mx.random.normal((B, T, Hv))  # raw gate projections
A_log, dt_bias = mx.log(mx.linspace(1.0, 16.0, Hv)), mx.zeros((Hv,))

q, k = mlx_gdn.normalize_qk(q, k)  # L2-normalise, fold Dk**-0.5 into q (as mlx-lm does)
y, state = mlx_gdn.gated_delta_update(q, k, v, a, b, A_log, dt_bias)  # state=None: zeros
y_next, state_next = mlx_gdn.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)  # carry on

g, beta = reference.gates(a, b, A_log, dt_bias)
y_ref, s_ref = reference.delta_rule(q, k, v, g, beta)
y2_ref, s2_ref = reference.delta_rule(q, k, v, g, beta, s_ref)
errors = {
    "y": reference.rel_error(y, y_ref),
    "state": reference.rel_error(state, s_ref),
    "y (second call)": reference.rel_error(y_next, y2_ref),
    "state (second call)": reference.rel_error(state_next, s2_ref),
}
print(f"backends here: {mlx_gdn.available_backends()}; y {tuple(y.shape)} {y.dtype}, state {tuple(state.shape)}")
for name, e in errors.items():
    print(f"relative error vs float64 reference, {name}: {e:.2e}")
ok = max(errors.values()) < tolerance(q.dtype)  # the package's bound for float32 inputs
print("CHECK", "ok" if ok else "FAILED")
raise SystemExit(0 if ok else 1)
