"""Unusual but valid inputs on every path: extreme gate parameters and strided, broadcast or
reversed layouts must give the reference's answer, never NaN."""

import contextlib

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_gdn
from mlx_gdn import reference
from mlx_gdn.sim import simulated_metal
from mlx_gdn.testing import assert_matches_reference, fresh_seed, random_inputs

PATHS = [("ops", "recurrent"), ("ops", "chunked"), ("metal", "recurrent"), ("metal", "chunked")]
B, T, HK, HV, DK, DV = 2, 5, 1, 2, 32, 16


def _on(backend):
    return simulated_metal() if backend == "metal" else contextlib.nullcontext()


@pytest.mark.parametrize("backend,algorithm", PATHS)
@pytest.mark.parametrize("lower_bound", [None, -2.0])
def test_overflowing_decay_rate(backend, algorithm, lower_bound):
    # exp(A_log) overflows float32 past A_log ~ 88.7; a zero or underflowing factor next to it
    # (softplus of a very negative a, or a + dt_bias exactly 0) must not make inf * 0 = NaN.
    seed = fresh_seed()
    x = random_inputs(B, T, HK, HV, DK, DV, seed=seed, mask=True)
    rng = np.random.default_rng(seed)
    A_log = mx.array([100.0, 95.0], dtype=mx.float32)
    if lower_bound is None:
        a = rng.choice([-1e4, -101.0, -96.0, -3.0, 2.0], size=(B, T, HV))
    else:
        a = rng.choice([0.0, 1e-39, -1e-3, 0.5], size=(B, T, HV))
    a, dt_bias = mx.array(a.astype(np.float32)), mx.zeros((HV,))
    with np.errstate(over="ignore"):
        g, beta = reference.gates(a, x.b, A_log, dt_bias, lower_bound)
    y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)
    with _on(backend):
        y, s = mlx_gdn.gated_delta_update(x.q, x.k, x.v, a, x.b, A_log, dt_bias, x.state, x.mask,
                                          lower_bound=lower_bound, backend=backend, algorithm=algorithm)
        mx.eval(y, s)
    assert_matches_reference(y, s, y_ref, s_ref, mx.float32, f"seed {seed}, {backend}/{algorithm}, lower_bound {lower_bound}")


def _layout(x: mx.array, how: str) -> mx.array:
    """`x` with the same values in a non-contiguous layout."""
    if how == "transposed":  # stored with the axes reversed, then viewed back
        order = tuple(range(x.ndim))[::-1]
        return mx.array(np.ascontiguousarray(np.array(x).transpose(order))).transpose(order)
    if how == "strided":  # every other element of a twice-longer last axis
        wide = mx.stack([x, mx.zeros_like(x)], axis=-1).reshape(*x.shape[:-1], 2 * x.shape[-1])
        return wide[..., ::2]
    if how == "reversed":  # negative strides along the first axis
        return mx.array(np.ascontiguousarray(np.array(x)[::-1]))[::-1]
    return x


LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided", "reversed"])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(PATHS),
    fused=st.booleans(),
    layouts=st.fixed_dictionaries({n: LAYOUTS for n in ("q", "k", "v", "g", "beta", "a", "b", "state", "mask")}),
    broadcast_gates=st.booleans(),
    int_mask=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_unusual_layouts(path, fused, layouts, broadcast_gates, int_mask, seed):
    backend, algorithm = path
    x = random_inputs(B, 7, HK, HV, DK, DV, seed=seed, mask=True)
    mask = x.mask.astype(mx.int32) if int_mask else x.mask
    lay = {n: _layout(getattr(x, n) if n != "mask" else mask, layouts[n]) for n in layouts}
    A_log, dt_bias = x.A_log, x.dt_bias
    if broadcast_gates:  # one value along T (stride 0), one A_log for every head
        for n in ("g", "beta", "a", "b"):
            lay[n] = mx.broadcast_to(lay[n][:, 2:3], lay[n].shape)
        A_log = mx.broadcast_to(A_log[:1], A_log.shape)
    if fused:
        g, beta = reference.gates(lay["a"], lay["b"], A_log, dt_bias)
    else:
        g, beta = lay["g"], lay["beta"]
    y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, g, beta, x.state, mask)
    with _on(backend):
        common = dict(state=lay["state"], mask=lay["mask"], backend=backend, algorithm=algorithm)
        if fused:
            y, s = mlx_gdn.gated_delta_update(lay["q"], lay["k"], lay["v"], lay["a"], lay["b"], A_log, dt_bias, **common)
        else:
            y, s = mlx_gdn.gated_delta_rule(lay["q"], lay["k"], lay["v"], lay["g"], lay["beta"], **common)
        mx.eval(y, s)
    assert_matches_reference(y, s, y_ref, s_ref, mx.float32,
                             f"seed {seed}, {backend}/{algorithm}, fused {fused}, layouts {layouts}, broadcast {broadcast_gates}")
