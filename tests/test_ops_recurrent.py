"""The exact ops path against the float64 reference, and its properties."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_gdn
from mlx_gdn.reference import delta_rule, gates, rel_error, to_numpy
from mlx_gdn.testing import assert_matches_reference, fresh_seed, random_inputs

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def check(y, s, y_ref, s_ref, dtype, seed):
    assert_matches_reference(y, s, y_ref, s_ref, dtype, f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", ["scalar", "key"])
@pytest.mark.parametrize("masked", [False, True])
def test_rule_matches_reference(dtype, gate, masked):
    seed = fresh_seed()
    x = random_inputs(2, 9, 2, 6, 32, 24, dtype=dtype, seed=seed, gate=gate, mask=masked)
    y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask, backend="ops", algorithm="recurrent")
    y_ref, s_ref = delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    check(y, s, y_ref, s_ref, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lower_bound", [None, -5.0])
@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_update_matches_reference(dtype, lower_bound, allow_neg_eigval):
    seed = fresh_seed()
    x = random_inputs(2, 7, 1, 3, 16, 16, dtype=dtype, seed=seed, mask=True)
    y, s = mlx_gdn.gated_delta_update(
        x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask,
        lower_bound=lower_bound, allow_neg_eigval=allow_neg_eigval, backend="ops", algorithm="recurrent",
    )
    g, beta = gates(x.a, x.b, x.A_log, x.dt_bias, lower_bound, allow_neg_eigval)
    y_ref, s_ref = delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)
    check(y, s, y_ref, s_ref, dtype, seed)


def test_gates_match_reference():
    seed = fresh_seed()
    x = random_inputs(3, 11, 1, 5, 8, 8, seed=seed)
    for lb in (None, -3.0):
        for neg in (False, True):
            g, beta = mlx_gdn.compute_gates(x.a, x.b, x.A_log, x.dt_bias, lb, neg)
            g_ref, beta_ref = gates(x.a, x.b, x.A_log, x.dt_bias, lb, neg)
            assert rel_error(g, g_ref) < 1e-6 and rel_error(beta, beta_ref) < 1e-6, f"seed={seed}"
    # softplus must not overflow for large arguments: a huge `a` means a decay of ~0, not NaN.
    big = mx.full((1, 1, 5), 1e4)
    g = mlx_gdn.compute_g(x.A_log, big, x.dt_bias)
    assert np.isfinite(to_numpy(g)).all() and (to_numpy(g) >= 0).all()


def test_reference_gates_keep_relative_precision_in_the_tails():
    """The float64 reference's beta = sigmoid(b) and lower-bound decay hold their relative precision
    far into the negative tail, where every path's float32 value is still accurate (a reference
    wrong there fails correct kernels on inputs that drive beta towards 0)."""
    import math

    b = np.array([[[-700.0, -60.0, -30.0, -5.0, 0.0, 5.0, 30.0, 700.0]]])
    exact = np.array([1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z)) for z in b.ravel()])
    zeros = np.zeros((1, 1, 8))
    _, beta = gates(zeros, b, np.zeros(8), np.zeros(8))
    assert np.all(np.abs(beta.ravel() - exact) <= 4 * np.finfo(np.float64).eps * exact), (beta.ravel(), exact)
    # lower-bound gate: g = exp(lower_bound * sigmoid(rate * (a + dt_bias))), here with rate = 1
    g, _ = gates(b, zeros, np.zeros(8), np.zeros(8), lower_bound=-2.0)
    assert np.all(np.abs(g.ravel() - np.exp(-2.0 * exact)) <= 4 * np.finfo(np.float64).eps * np.exp(-2.0 * exact))


def test_masked_steps_keep_state_and_write_zeros():
    seed = fresh_seed()
    x = random_inputs(2, 6, 1, 2, 16, 8, seed=seed, mask=True)
    mask = np.ones((2, 6), bool)
    mask[0, 2:5] = False
    mask[1, -1] = False
    y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, mx.array(mask), backend="ops")
    y = to_numpy(y)
    assert (y[~mask] == 0).all(), f"seed={seed}"
    # Dropping the masked steps altogether gives the same final state for sequence 1.
    keep = mx.array(np.flatnonzero(mask[1]))
    sub = lambda a: a[1:2, keep]  # noqa: E731
    _, s1 = mlx_gdn.gated_delta_rule(sub(x.q), sub(x.k), sub(x.v), sub(x.g), sub(x.beta), x.state[1:2], backend="ops")
    assert rel_error(s[1:2], s1) < 1e-6, f"seed={seed}"


def test_state_none_means_zeros():
    seed = fresh_seed()
    x = random_inputs(1, 5, 1, 2, 16, 8, seed=seed, with_state=False)
    y0, s0 = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, backend="ops")
    y1, s1 = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, mx.zeros_like(s0), backend="ops")
    assert mx.array_equal(y0, y1) and mx.array_equal(s0, s1)


@pytest.mark.parametrize("split", [[1, 1, 1, 1, 1, 1, 1], [3, 4], [1, 5, 1]])
def test_state_carried_equals_one_call(split):
    """Prefill then token-by-token decode equals one long call."""
    seed = fresh_seed()
    x = random_inputs(2, sum(split), 2, 4, 16, 8, seed=seed, mask=True)
    y_all, s_all = mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask, backend="ops")
    s, ys, t0 = x.state, [], 0
    for n in split:
        sl = lambda a: a[:, t0 : t0 + n]  # noqa: E731
        y, s = mlx_gdn.gated_delta_update(sl(x.q), sl(x.k), sl(x.v), sl(x.a), sl(x.b), x.A_log, x.dt_bias, s, sl(x.mask), backend="ops")
        ys.append(y)
        t0 += n
    assert rel_error(mx.concatenate(ys, 1), y_all) < 1e-6, f"seed={seed}"
    assert rel_error(s, s_all) < 1e-6, f"seed={seed}"


def test_decay_one_and_near_zero():
    seed = fresh_seed()
    for decay in ("one", "mixed"):
        x = random_inputs(1, 16, 1, 2, 32, 16, seed=seed, decay=decay)
        g = x.g
        if decay == "mixed":
            g = mx.where(mx.arange(16)[None, :, None] % 4 == 0, 1e-30, g)
        y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, g, x.beta, x.state, backend="ops")
        y_ref, s_ref = delta_rule(x.q, x.k, x.v, g, x.beta, x.state)
        check(y, s, y_ref, s_ref, mx.float32, seed)


def test_bfloat16_long_run_has_no_drift():
    """2,048 bfloat16 steps stay within tolerance of the float32-input reference."""
    seed = fresh_seed()
    T = 2048
    x32 = random_inputs(1, T, 1, 2, 32, 32, seed=seed, decay="slow", dtype=mx.float32)
    cast = lambda a: a.astype(mx.bfloat16)  # noqa: E731
    y, s = mlx_gdn.gated_delta_rule(cast(x32.q), cast(x32.k), cast(x32.v), cast(x32.g), cast(x32.beta), x32.state, backend="ops")
    y_ref, s_ref = delta_rule(x32.q, x32.k, x32.v, x32.g, x32.beta, x32.state)
    assert np.isfinite(to_numpy(y)).all()
    # Error over the last quarter alone: drift would show up there.
    tail = slice(3 * T // 4, T)
    e_tail = rel_error(to_numpy(y)[:, tail], y_ref[:, tail])
    assert rel_error(y, y_ref) < 2e-2 and e_tail < 2e-2, f"seed={seed} tail err {e_tail:.2e}"
    assert rel_error(s, s_ref) < 2e-2, f"seed={seed}"


def test_gradients_match_float64_finite_differences():
    """mx.grad through the ops path equals a directional derivative of the reference."""
    seed = fresh_seed()
    x = random_inputs(1, 5, 1, 2, 8, 4, seed=seed, mask=True)
    rng = np.random.default_rng(seed)
    w_y = rng.standard_normal((1, 5, 2, 4))
    w_s = rng.standard_normal((1, 2, 4, 8))

    def loss(q, k, v, g, beta, s0):
        y, s = mlx_gdn.gated_delta_rule(q, k, v, g, beta, s0, x.mask, backend="ops", algorithm="recurrent")
        return (y * mx.array(w_y, mx.float32)).sum() + (s * mx.array(w_s, mx.float32)).sum()

    args = [x.q, x.k, x.v, x.g, x.beta, x.state]
    grads = mx.grad(loss, argnums=tuple(range(6)))(*args)
    dirs = [rng.standard_normal(a.shape) for a in args]
    predicted = sum(float((to_numpy(gr) * d).sum()) for gr, d in zip(grads, dirs))

    def loss_ref(eps):
        q, k, v, g, beta, s0 = (to_numpy(a) + eps * d for a, d in zip(args, dirs))
        y, s = delta_rule(q, k, v, g, beta, s0, x.mask)
        return (y * w_y).sum() + (s * w_s).sum()

    h = 1e-5
    fd = (loss_ref(h) - loss_ref(-h)) / (2 * h)
    assert abs(predicted - fd) <= 1e-3 * max(1.0, abs(fd)), f"seed={seed} grad {predicted} vs fd {fd}"


shapes = st.tuples(
    st.integers(1, 3),  # B
    st.integers(1, 12),  # T
    st.integers(1, 3),  # Hk
    st.integers(1, 4),  # Hv / Hk
    st.sampled_from([4, 8, 16, 32, 64]),  # Dk
    st.sampled_from([4, 8, 16, 64]),  # Dv
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, gate=st.sampled_from(["scalar", "key"]), masked=st.booleans(), dtype=st.sampled_from(DTYPES),
       with_state=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_property_any_shape(shape, gate, masked, dtype, with_state, seed):
    B, T, Hk, r, Dk, Dv = shape
    x = random_inputs(B, T, Hk, Hk * r, Dk, Dv, dtype=dtype, seed=seed, gate=gate, mask=masked, with_state=with_state)
    y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask, backend="ops", algorithm="recurrent")
    y_ref, s_ref = delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    check(y, s, y_ref, s_ref, dtype, seed)


mlx_lm_gd = pytest.importorskip("mlx_lm.models.gated_delta", reason="mlx-lm not installed")


@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_agrees_with_mlx_lm_ops(gate):
    seed = fresh_seed()
    x = random_inputs(2, 10, 2, 4, 32, 16, seed=seed, gate=gate, mask=True)
    y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask, backend="ops")
    y2, s2 = mlx_lm_gd.gated_delta_ops(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    m = np.asarray(x.mask)
    # mlx-lm writes the unmasked output at masked steps; this package writes zeros there.
    assert rel_error(to_numpy(y)[m], to_numpy(y2)[m]) < 1e-5, f"seed={seed}"
    assert rel_error(s, s2) < 1e-5, f"seed={seed}"


def test_agrees_with_mlx_lm_update():
    seed = fresh_seed()
    x = random_inputs(2, 8, 2, 6, 64, 32, seed=seed, dtype=mx.bfloat16)
    y, s = mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, backend="ops")
    y2, s2 = mlx_lm_gd.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, use_kernel=False)
    assert rel_error(y, y2) < 2e-2 and rel_error(s, s2) < 2e-2, f"seed={seed}"
    # mlx-lm rounds beta = sigmoid(b) to bfloat16; this package keeps gates in float32,
    # so it must sit at least as close to the float64 reference.
    g, beta = gates(x.a, x.b, x.A_log, x.dt_bias)
    _, s_ref = delta_rule(x.q, x.k, x.v, g, beta, x.state)
    assert rel_error(s, s_ref) <= rel_error(s2, s_ref), f"seed={seed}"
