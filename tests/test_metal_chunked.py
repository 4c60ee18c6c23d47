"""Chunked Metal kernels through the simulator and the public API, against the float64 reference."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_gdn
from mlx_gdn.ops import backend as ops_backend
from mlx_gdn.metal.chunked import CHUNK, supports_chunked
from mlx_gdn.reference import delta_rule, gates, to_numpy
from mlx_gdn.testing import assert_matches_reference, fresh_seed, random_inputs
from mlx_gdn.validate import check_rule

sim = pytest.importorskip("mlx_gdn.sim")
simulated_metal = getattr(sim, "simulated_metal", None)
if simulated_metal is None:  # pragma: no cover
    pytest.skip("mlx_gdn.sim.simulated_metal is not available", allow_module_level=True)

# One small shape for most cases, so the simulator compiles few template instances.
SHAPE = dict(B=2, Hk=1, Hv=2, Dk=16, Dv=8)


@pytest.fixture
def no_ops(monkeypatch):
    """Fail if a call meant for the kernels falls back to the ops backend."""

    def refuse(*args, **kwargs):
        raise AssertionError("the ops backend ran where the chunked Metal kernels should have")

    monkeypatch.setattr(ops_backend, "run", refuse)


def inputs(T, seed, dtype=mx.float32, shape=SHAPE, **kw):
    s = shape
    return random_inputs(s["B"], T, s["Hk"], s["Hv"], s["Dk"], s["Dv"], dtype=dtype, seed=seed, **kw)


def rule(x, g=None, state="x"):
    state = x.state if isinstance(state, str) else state
    with simulated_metal():
        y, s = mlx_gdn.gated_delta_rule(
            x.q, x.k, x.v, x.g if g is None else g, x.beta, state, x.mask, backend="metal", algorithm="chunked"
        )
        mx.eval(y, s)
    return y, s


def check(y, s, y_ref, s_ref, dtype, seed, what=""):
    assert_matches_reference(y, s, y_ref, s_ref, dtype, f"seed={seed} {what}")


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(no_ops, dtype, masked):
    seed = fresh_seed()
    T = CHUNK + 1 + int(np.random.default_rng(seed).integers(0, CHUNK - 1))  # a padded tail
    x = inputs(T, seed, dtype, mask=masked)
    y, s = rule(x)
    check(y, s, *delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask), dtype, seed, f"T={T}")


@pytest.mark.parametrize("T", [1, 7, CHUNK - 1, CHUNK, 2 * CHUNK + 3])
def test_lengths(no_ops, T):
    """T = 1, odd, below a chunk, exactly a chunk, several chunks and a tail."""
    seed = fresh_seed()
    x = inputs(T, seed, mask=True)
    y, s = rule(x)
    check(y, s, *delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask), mx.float32, seed, f"T={T}")


@pytest.mark.parametrize("Hk,Hv,Dk,Dv", [(2, 6, 32, 24), (1, 4, 8, 16), (1, 1, 128, 128)])
def test_heads_and_dims(no_ops, Hk, Hv, Dk, Dv):
    """GQA ratios 3 and 4, state-row tiles of 8 and 32, the model's head size."""
    seed = fresh_seed()
    x = inputs(CHUNK + 5, seed, shape=dict(B=1, Hk=Hk, Hv=Hv, Dk=Dk, Dv=Dv))
    y, s = rule(x)
    check(y, s, *delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state), mx.float32, seed)


def test_extreme_decays(no_ops):
    """Gates of exactly 0, 1e-30 and exactly 1, in runs that cross a chunk boundary."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    T = 3 * CHUNK - 3
    x = inputs(T, seed)
    g = to_numpy(x.g).astype(np.float32)
    g[rng.random(g.shape) < 0.15] = 1e-30
    g[:, 3:20] = 1e-30
    g[:, 20 : CHUNK + 9] = 1.0
    g[:, CHUNK + 12] = 0.0
    g = mx.array(g)
    y, s = rule(x, g=g)
    check(y, s, *delta_rule(x.q, x.k, x.v, g, x.beta, x.state), mx.float32, seed)


def test_masked_steps_write_zeros(no_ops):
    seed = fresh_seed()
    x = inputs(CHUNK + 6, seed)
    mask = np.ones((2, CHUNK + 6), bool)
    mask[0, 2 : CHUNK + 3] = False  # a gap across the chunk boundary
    mask[1, -1] = False
    x.mask = mx.array(mask)
    y, s = rule(x)
    assert (to_numpy(y)[~mask] == 0).all(), f"seed={seed}"
    check(y, s, *delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask), mx.float32, seed)


def test_state_carried_and_no_initial_state(no_ops):
    """Two chunked calls (split off a chunk boundary) equal one long call; state=None is zeros.
    The pieces are slices, so the kernels also see non-contiguous inputs."""
    seed = fresh_seed()
    T, cut = 2 * CHUNK + 5, CHUNK - 4
    x = inputs(T, seed, mask=True)
    y_all, s_all = delta_rule(x.q, x.k, x.v, x.g, x.beta, None, x.mask)
    part = lambda a, i, j: a[:, i:j]  # noqa: E731
    with simulated_metal():
        args = lambda i, j: [part(a, i, j) for a in (x.q, x.k, x.v, x.g, x.beta)]  # noqa: E731
        y1, s = mlx_gdn.gated_delta_rule(*args(0, cut), None, part(x.mask, 0, cut), backend="metal", algorithm="chunked")
        y2, s = mlx_gdn.gated_delta_rule(*args(cut, T), s, part(x.mask, cut, T), backend="metal", algorithm="chunked")
        mx.eval(y1, y2, s)
    check(mx.concatenate([y1, y2], axis=1), s, y_all, s_all, mx.float32, seed)


@pytest.mark.parametrize("dtype,lower_bound,neg", [(mx.float32, None, False), (mx.float32, -3.0, True), (mx.bfloat16, None, True)])
def test_fused_gating(no_ops, dtype, lower_bound, neg):
    """Gates computed in the prep kernel; an int mask; a few huge `a` whose decay underflows."""
    seed = fresh_seed()
    x = inputs(CHUNK + 3, seed, dtype, mask=True)
    a = to_numpy(x.a)
    a[:, 5] = 80.0
    x.a = mx.array(a.astype(np.float32)).astype(x.a.dtype)
    x.mask = x.mask.astype(mx.int32)
    with simulated_metal():
        y, s = mlx_gdn.gated_delta_update(
            x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask,
            lower_bound=lower_bound, allow_neg_eigval=neg, backend="metal", algorithm="chunked",
        )
        mx.eval(y, s)
    g, beta = gates(x.a, x.b, x.A_log, x.dt_bias, lower_bound, neg)
    check(y, s, *delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask), dtype, seed)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_per_key_matches_reference(no_ops, dtype, masked):
    """Per-key gates (mixed, like a trained layer's: some near 0, some exactly 1) over chunks
    with a padded tail; the decays enter the kernel folded into K and Q per 8-step tile."""
    seed = fresh_seed()
    T = 2 * CHUNK + 1 + int(np.random.default_rng(seed).integers(0, CHUNK - 1))
    x = inputs(T, seed, dtype, gate="key", mask=masked)
    assert supports_chunked(check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask))
    y, s = rule(x)
    check(y, s, *delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask), dtype, seed, f"T={T}")


def test_per_key_gates_near_zero_and_one(no_ops):
    """Per-key gates where folding the decay naively overflows: columns of 1e-30, 1e-8 and exactly
    0 for runs longer than a tile, next to columns of exactly 1, and a column alternating between
    the two, across chunk boundaries."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    x = inputs(3 * CHUNK - 3, seed, gate="key")
    g = to_numpy(x.g).astype(np.float32)
    g[..., 0:4] = 1.0
    g[..., 4:6] = 1e-30
    g[..., 6:8] = 1e-8
    g[:, 3 : CHUNK + 5, :, 8:10] = 0.0
    g[:, ::2, :, 10] = 1e-30
    g[:, 1::2, :, 10] = 1.0
    g[rng.random(g.shape) < 0.05] = 1e-30
    g = mx.array(g)
    y, s = rule(x, g=g)
    check(y, s, *delta_rule(x.q, x.k, x.v, g, x.beta, x.state), mx.float32, seed)


@pytest.mark.parametrize("dtype,lower_bound,neg,dt_key", [(mx.float32, None, False, True), (mx.float32, -3.0, True, False),
                                                          (mx.bfloat16, None, True, True)])
def test_per_key_fused_gating(no_ops, dtype, lower_bound, neg, dt_key):
    """Per-key fused gates computed in the first kernel: a [B,T,Hv,Dk], dt_bias [Hv,Dk] or [Hv]."""
    seed = fresh_seed()
    x = inputs(CHUNK + 3, seed, dtype, mask=True, fused_gate="key")
    a = to_numpy(x.a)
    a[:, 5, :, :3] = 80.0
    a[:, 9, :, 3:6] = -80.0
    x.a = mx.array(a.astype(np.float32)).astype(x.a.dtype)
    dt = x.dt_bias if dt_key else x.dt_bias[:, 0]
    with simulated_metal():
        y, s = mlx_gdn.gated_delta_update(
            x.q, x.k, x.v, x.a, x.b, x.A_log, dt, x.state, x.mask,
            lower_bound=lower_bound, allow_neg_eigval=neg, backend="metal", algorithm="chunked",
        )
        mx.eval(y, s)
    g, beta = gates(x.a, x.b, x.A_log, dt, lower_bound, neg)
    check(y, s, *delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask), dtype, seed)


def test_unsupported_shapes_fall_back_to_ops():
    """Head sizes off a multiple of 8 are refused and run by the ops chunked path."""
    seed = fresh_seed()
    xo = inputs(9, seed, shape=dict(B=1, Hk=1, Hv=1, Dk=12, Dv=8))
    assert not supports_chunked(check_rule(xo.q, xo.k, xo.v, xo.g, xo.beta, xo.state, None))
    y, s = rule(xo)
    check(y, s, *delta_rule(xo.q, xo.k, xo.v, xo.g, xo.beta, xo.state), mx.float32, seed, "Dk=12")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 3 * CHUNK),
    Hk=st.integers(1, 2),
    ratio=st.integers(1, 3),
    Dk=st.sampled_from([8, 16]),
    Dv=st.sampled_from([8, 16]),
    masked=st.booleans(),
    decay=st.sampled_from(["mixed", "slow", "one"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_small_shapes(no_ops, B, T, Hk, ratio, Dk, Dv, masked, decay, seed):
    x = random_inputs(B, T, Hk, Hk * ratio, Dk, Dv, seed=seed, mask=masked, decay=decay)
    y, s = rule(x)
    check(y, s, *delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask), mx.float32, seed)
