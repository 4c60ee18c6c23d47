"""Gates whose decays fall below float32's normal range: the ops paths form them as exact zeros
(`gating.LOG_DECAY_FLOOR`), which must leave every answer equal to the float64 reference's and
every gradient finite and right."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_gdn
from mlx_gdn.ops.chunked import chunk_len, float32_tolerance
from mlx_gdn.reference import delta_rule, gates, to_numpy
from mlx_gdn.testing import assert_matches_reference, fresh_seed, random_inputs

FLT_MIN = float(np.finfo(np.float32).tiny)  # smallest normal float32
T = chunk_len() + 9  # one full chunk and a padded one
ALGORITHMS = ["recurrent", "chunked"]
DTYPES = [mx.float32, mx.bfloat16]


def tol(dtype, algorithm):
    if dtype == mx.float32 and algorithm == "chunked":
        return float32_tolerance()
    return None  # the package's default by dtype


def harsh_gates(seed, dtype, Hv):
    """Raw gate inputs of a trained layer, pushed further: exp(A_log) in [0.5, 16]; per head, 40%
    of the steps with a decay in float32's subnormal range (log g in [-104, -87]) or below it, the
    rest with a of scale 2 (decays anywhere in (0, 1)), and a stretch of mild steps so that the
    state still carries information."""
    rng = np.random.default_rng(seed)
    x = random_inputs(1, T, 1, Hv, 16, 8, dtype=dtype, seed=seed)
    A_log = np.log(rng.uniform(0.5, 16.0, Hv))
    dt_bias = rng.standard_normal(Hv)
    rate = np.exp(A_log)
    # softplus(x) ~ x for these x: rate * (a + dt_bias) spans the subnormal range and past it.
    tiny = rng.uniform(87.5, 120.0, (1, T, Hv)) / rate - dt_bias
    a = np.where(rng.random((1, T, Hv)) < 0.4, tiny, rng.standard_normal((1, T, Hv)) * 2.0)
    a[:, 10:16] = -8.0  # decays close to 1
    g_ref, _ = gates(a, to_numpy(x.b), A_log, dt_bias)
    f32 = np.float32
    return x, mx.array(a.astype(f32)).astype(dtype), mx.array(A_log.astype(f32)), mx.array(dt_bias.astype(f32)), g_ref


def chunk_products(g):
    """Decays from each step to every later one within the chunks (float64), the quantities the
    chunked form multiplies with."""
    lg = np.log(np.maximum(g, 1e-300))  # float64 keeps these decays; a true 0 counts as tiny
    C = chunk_len()
    out = []
    for c0 in range(0, g.shape[1], C):
        cs = np.cumsum(lg[:, c0:c0 + C], axis=1)  # [B, C, Hv]
        n = cs.shape[1]
        i, j = np.tril_indices(n, -1)
        out.append((cs[:, i] - cs[:, j]).ravel())  # log decay from step j to step i > j
    return np.exp(np.concatenate(out))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fused_gates_with_subnormal_decays_match_reference(algorithm, dtype):
    seed = fresh_seed()
    x, a, A_log, dt_bias, g_ref = harsh_gates(seed, dtype, Hv=4)
    # The inputs really reach the subnormal range, per step and within chunks.
    assert (g_ref < FLT_MIN).mean() > 0.2, f"seed={seed}"
    assert (chunk_products(g_ref) < FLT_MIN).mean() > 0.3, f"seed={seed}"
    y, s = mlx_gdn.gated_delta_update(x.q, x.k, x.v, a, x.b, A_log, dt_bias, x.state, backend="ops",
                                      algorithm=algorithm)
    # The reference's gates from the inputs as the call saw them (a rounded to dtype).
    g64, beta64 = gates(to_numpy(a), to_numpy(x.b), to_numpy(A_log), to_numpy(dt_bias))
    y_ref, s_ref = delta_rule(x.q, x.k, x.v, g64, beta64, x.state)
    assert_matches_reference(y, s, y_ref, s_ref, dtype, f"seed={seed} {algorithm}", tol(dtype, algorithm))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_precomputed_subnormal_and_tiny_gates_match_reference(algorithm, dtype, gate):
    """g given directly with subnormal values, values just above and below the flush floor,
    exact zeros, and runs of them."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    x = random_inputs(2, T, 1, 3, 16, 8, dtype=dtype, seed=seed, gate=gate, mask=True)
    g = to_numpy(x.g).astype(np.float32)
    pick = rng.random(g.shape)
    tiny = rng.choice(np.array([1e-39, 1e-41, 3e-45, 1e-30, 1e-20, 1e-17, 1e-12, 0.0], np.float32), g.shape)
    g = np.where(pick < 0.4, tiny, g)
    g[:, 3:9] = 1e-39
    g = mx.array(g).astype(dtype)
    y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, g, x.beta, x.state, x.mask, backend="ops", algorithm=algorithm)
    y_ref, s_ref = delta_rule(x.q, x.k, x.v, g, x.beta, x.state, x.mask)
    assert_matches_reference(y, s, y_ref, s_ref, dtype, f"seed={seed} {algorithm}", tol(dtype, algorithm))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradients_with_subnormal_decays(algorithm):
    """mx.grad through the fused gates with decays far below float32's range: finite, and equal to
    a directional derivative of the float64 reference (gates included)."""
    seed = fresh_seed()
    x, a, A_log, dt_bias, _ = harsh_gates(seed, mx.float32, Hv=2)
    rng = np.random.default_rng(seed + 1)
    w_y = rng.standard_normal((1, T, 2, 8))
    w_s = rng.standard_normal((1, 2, 8, 16))
    args = [x.q, x.k, x.v, a, x.b, A_log, dt_bias, x.state]

    def loss(q, k, v, a, b, A_log, dt_bias, s0):
        y, s = mlx_gdn.gated_delta_update(q, k, v, a, b, A_log, dt_bias, s0, backend="ops", algorithm=algorithm)
        return (y * mx.array(w_y, mx.float32)).sum() + (s * mx.array(w_s, mx.float32)).sum()

    grads = mx.grad(loss, argnums=tuple(range(len(args))))(*args)
    names = ("q", "k", "v", "a", "b", "A_log", "dt_bias", "state")
    for name, gr in zip(names, grads):
        assert np.isfinite(to_numpy(gr)).all(), f"seed={seed} d{name} non-finite"
    dirs = [rng.standard_normal(t.shape) for t in args]
    predicted = sum(float((to_numpy(gr) * d).sum()) for gr, d in zip(grads, dirs))

    def loss_ref(eps):
        q, k, v, a_, b, A_, dt, s0 = (to_numpy(t) + eps * d for t, d in zip(args, dirs))
        g, beta = gates(a_, b, A_, dt)
        y, s = delta_rule(q, k, v, g, beta, s0)
        return (y * w_y).sum() + (s * w_s).sum()

    h = 1e-5
    fd = (loss_ref(h) - loss_ref(-h)) / (2 * h)
    assert abs(predicted - fd) <= 1e-3 * max(1.0, abs(fd)), f"seed={seed} {algorithm}: grad {predicted} vs fd {fd}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_extreme_gates_give_no_nan(algorithm):
    """a + dt_bias in the thousands, exp(A_log) at float32's edge, a lower bound far below the
    floor: decays of exactly 0, outputs and gradients finite."""
    seed = fresh_seed()
    x = random_inputs(1, T, 1, 2, 16, 8, seed=seed)
    a = mx.array(np.random.default_rng(seed).uniform(-50.0, 5000.0, (1, T, 2)).astype(np.float32))
    for A_log, lb in ((mx.array([np.log(16.0), 89.0], mx.float32), None), (mx.array([3.0, 89.0], mx.float32), -500.0)):
        def loss(q, k, v, a, s0):
            y, s = mlx_gdn.gated_delta_update(q, k, v, a, x.b, A_log, x.dt_bias, s0, lower_bound=lb,
                                              backend="ops", algorithm=algorithm)
            return (y * y).sum() + (s * s).sum()

        val, grads = mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(x.q, x.k, x.v, a, x.state)
        assert np.isfinite(val.item()), f"seed={seed} lower_bound={lb}"
        for name, gr in zip("q k v a state".split(), grads):
            assert np.isfinite(to_numpy(gr)).all(), f"seed={seed} lower_bound={lb}: d{name} non-finite"
