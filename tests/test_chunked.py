"""The chunked (WY-form) ops path against the float64 reference and the exact recurrence.

Runs on mx.default_device(): on MLX's CUDA backend float32 matmuls use TF32 unless
MLX_ENABLE_TF32=0, and the float32 tolerance is the one stated in ops.chunked's docstring.
"""


import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_gdn
from mlx_gdn import backends as crossover
from mlx_gdn.ops.chunked import chunk_len, chunked_rule, float32_tolerance
from mlx_gdn.ops.recurrent import recurrent_rule
from mlx_gdn.reference import delta_rule, gates, rel_error, to_numpy
from mlx_gdn.testing import TOLERANCE, assert_matches_reference, fresh_seed, random_inputs, tolerance


# float32 contract 1e-4; with TF32 products (10-bit mantissa) the stated bound is 2e-3.
F32_TOL = float32_tolerance()
TOL = {dt: tolerance(dt, matmul=True) for dt in TOLERANCE}
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
CHUNK = chunk_len()


def run(x, g=None, **kw):
    g = x.g if g is None else g
    return chunked_rule(x.q, x.k, x.v, g, x.beta, x.state, x.mask, **kw)


def check(y, s, y_ref, s_ref, dtype, seed, what=""):
    assert_matches_reference(y, s, y_ref, s_ref, dtype, f"seed={seed} {what}", tol=TOL[dtype])


# Gate kinds: one per head, and one per key column in each form of the within-chunk products.
GATES = [("scalar", None), ("key", "pairwise"), ("key", "folded")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate,form", GATES)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(dtype, gate, form, masked):
    seed = fresh_seed()
    # T crosses a chunk boundary and leaves a padded tail.
    T = CHUNK + 1 + int(np.random.default_rng(seed).integers(0, CHUNK - 1))
    x = random_inputs(2, T, 2, 4, 32, 24, dtype=dtype, seed=seed, gate=gate, mask=masked)
    y, s = run(x, key_form=form)
    y_ref, s_ref = delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    check(y, s, y_ref, s_ref, dtype, seed, f"T={T}")


@pytest.mark.parametrize("T", [1, 2, 7, CHUNK - 1, CHUNK, 2 * CHUNK + 3])
def test_lengths(T):
    """T = 1, odd, smaller than a chunk, exactly a chunk, several chunks with a tail."""
    seed = fresh_seed()
    x = random_inputs(2, T, 1, 3, 16, 8, seed=seed, mask=True)
    y, s = run(x)
    check(y, s, *delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask), mx.float32, seed, f"T={T}")


@pytest.mark.parametrize("Hk,Hv,Dk,Dv", [(2, 2, 64, 64), (1, 2, 128, 64), (2, 6, 8, 16), (1, 4, 256, 16), (1, 1, 192, 8)])
def test_heads_and_dims(Hk, Hv, Dk, Dv):
    """GQA ratios 1-4 and Dk in {8, 64, 128, 192, 256}."""
    seed = fresh_seed()
    x = random_inputs(1, 37, Hk, Hv, Dk, Dv, seed=seed)
    y, s = run(x)
    check(y, s, *delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state), mx.float32, seed)


@pytest.mark.parametrize("gate,form", GATES)
def test_extreme_decays_and_repeated_keys(gate, form):
    """Gates of exactly 0, 1e-30 and exactly 1 in runs and at random, and a run of one repeated
    key with beta = 1 (where (I + A) has the largest inverse entries)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    T = 3 * CHUNK - 5
    x = random_inputs(2, T, 1, 2, 32, 16, seed=seed, gate=gate)
    g = to_numpy(x.g).astype(np.float32)
    g[rng.random(g.shape) < 0.15] = 1e-30
    g[:, 5:30] = 1e-30
    g[:, 30 : CHUNK + 10] = 1.0
    g[:, CHUNK + 20] = 0.0
    k = to_numpy(x.k).astype(np.float32)
    beta = to_numpy(x.beta).astype(np.float32)
    r0 = 2 * CHUNK - 10
    k[:, r0 : r0 + 40] = k[:, r0 : r0 + 1]
    beta[:, r0 : r0 + 40] = 1.0
    g, k, beta = mx.array(g), mx.array(k), mx.array(beta)
    y, s = chunked_rule(x.q, k, x.v, g, beta, x.state, key_form=form)
    check(y, s, *delta_rule(x.q, k, x.v, g, beta, x.state), mx.float32, seed)


@pytest.mark.parametrize("form", ["pairwise", "folded"])
@pytest.mark.parametrize("chunk", [32, 64])
def test_key_gates_near_zero_and_one(form, chunk, monkeypatch):
    """Per-key gates where folding the decay into K and Q naively overflows: columns whose gates
    are 1e-30, 1e-8 or exactly 0 for runs longer than a sub-chunk, next to columns of exactly 1,
    and a column that alternates between the two, across several chunks (of 2 and 4 sub-chunks)."""
    from mlx_gdn.ops import chunked as oc

    for device in ("cpu", "gpu"):
        monkeypatch.setitem(oc.CHUNK, device, chunk)
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    T = 3 * chunk + 7
    x = random_inputs(1, T, 1, 2, 32, 16, seed=seed, gate="key")
    g = to_numpy(x.g).astype(np.float32)
    g[..., 0:8] = 1.0
    g[..., 8:12] = 1e-30
    g[..., 12:16] = 1e-8
    g[:, 3:chunk, :, 16:20] = 0.0
    g[:, ::2, :, 20] = 1e-30
    g[:, 1::2, :, 20] = 1.0
    g[rng.random(g.shape) < 0.05] = 1e-30
    g = mx.array(g)
    y, s = chunked_rule(x.q, x.k, x.v, g, x.beta, x.state, key_form=form)
    check(y, s, *delta_rule(x.q, x.k, x.v, g, x.beta, x.state), mx.float32, seed, form)


def test_key_form_checked():
    x = random_inputs(1, 4, 1, 1, 8, 8, seed=0, gate="key")
    with pytest.raises(ValueError, match="key_form"):
        run(x, key_form="naive")


def test_long_sequence_no_overflow():
    """T = 16384 with slow decays: the decay over the whole sequence underflows float32 many
    times over, which must not matter when log-decays are summed within chunks only."""
    seed = fresh_seed()
    x = random_inputs(1, 16384, 1, 1, 8, 8, seed=seed, decay="slow")
    y, s = run(x)
    check(y, s, *delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state), mx.float32, seed)


def test_masked_steps_are_identity_steps():
    seed = fresh_seed()
    x = random_inputs(2, CHUNK + 9, 1, 2, 16, 8, seed=seed)
    mask = np.ones((2, CHUNK + 9), bool)
    mask[0, 3:CHUNK + 4] = False  # a gap across a chunk boundary
    mask[1, -1] = False
    q, k, v = (to_numpy(t) for t in (x.q, x.k, x.v))
    q[~mask] = np.nan  # masked inputs are ignored, not multiplied by zero
    v[~mask] = np.inf
    y, s = chunked_rule(mx.array(q.astype(np.float32)), x.k, mx.array(v.astype(np.float32)), x.g, x.beta, x.state, mx.array(mask))
    y = to_numpy(y)
    assert (y[~mask] == 0).all(), f"seed={seed}"
    keep = mx.array(np.flatnonzero(mask[0]))
    sub = lambda a: a[0:1, keep]  # noqa: E731
    _, s0 = chunked_rule(sub(x.q), sub(x.k), sub(x.v), sub(x.g), sub(x.beta), x.state[0:1])
    assert rel_error(s[0:1], s0) < F32_TOL, f"seed={seed}"


def test_state_carried_across_calls():
    """Chunked prefill in two uneven pieces, then recurrent decode, equals one long call."""
    seed = fresh_seed()
    T = 2 * CHUNK + 7
    x = random_inputs(2, T, 1, 2, 16, 16, seed=seed, mask=True)
    y_all, s_all = delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    cut, dec = CHUNK - 3, T - 2
    part = lambda a, i, j: a[:, i:j]  # noqa: E731
    args = lambda i, j: [part(a, i, j) for a in (x.q, x.k, x.v, x.g, x.beta)]  # noqa: E731
    y1, s = chunked_rule(*args(0, cut), x.state, part(x.mask, 0, cut))
    y2, s = chunked_rule(*args(cut, dec), s, part(x.mask, cut, dec))
    y3, s = recurrent_rule(*args(dec, T), s, part(x.mask, dec, T))
    y = mx.concatenate([y1, y2, y3], axis=1)
    check(y, s, y_all, s_all, mx.float32, seed)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_public_api(dtype):
    """gated_delta_rule and gated_delta_update reach this path with backend="ops", algorithm="chunked"."""
    seed = fresh_seed()
    x = random_inputs(2, 21, 2, 4, 16, 16, dtype=dtype, seed=seed, mask=True)
    y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask, backend="ops", algorithm="chunked")
    check(y, s, *delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask), dtype, seed, "rule")
    y, s = mlx_gdn.gated_delta_update(
        x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask,
        lower_bound=-4.0, allow_neg_eigval=True, backend="ops", algorithm="chunked",
    )
    g, beta = gates(x.a, x.b, x.A_log, x.dt_bias, -4.0, True)
    check(y, s, *delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask), dtype, seed, "update")


def test_auto_picks_chunked_from_crossover(monkeypatch):
    seed = fresh_seed()
    x = random_inputs(1, 12, 1, 1, 8, 8, seed=seed)
    monkeypatch.setitem(crossover.CHUNKED_FROM_T, "ops", 10)
    calls = []
    import mlx_gdn.ops.chunked as oc

    orig = oc.chunked_rule
    monkeypatch.setattr(oc, "chunked_rule", lambda *a: calls.append(1) or orig(*a))
    y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, backend="ops")
    assert calls, "auto did not pick the chunked form above the crossover"
    check(y, s, *delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state), mx.float32, seed)


@pytest.mark.parametrize("gate,form", GATES)
def test_gradients_match_recurrent(gate, form):
    """mx.grad through the chunked form equals mx.grad through the exact recurrence, for every input."""
    seed = fresh_seed()
    x = random_inputs(2, CHUNK + 5, 1, 2, 16, 8, seed=seed, gate=gate, mask=True)
    rng = np.random.default_rng(seed + 1)
    wy = mx.array(rng.standard_normal((2, CHUNK + 5, 2, 8)).astype(np.float32))
    ws = mx.array(rng.standard_normal((2, 2, 8, 16)).astype(np.float32))

    def loss(rule):
        def f(q, k, v, g, beta, state):
            y, s = rule(q, k, v, g, beta, state, x.mask)
            return (y * wy).sum() + (s * ws).sum()

        return mx.grad(f, argnums=(0, 1, 2, 3, 4, 5))

    args = (x.q, x.k, x.v, x.g, x.beta, x.state)
    gc = loss(lambda *a: chunked_rule(*a, key_form=form))(*args)
    gr = loss(recurrent_rule)(*args)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), gc, gr):
        assert np.isfinite(to_numpy(a)).all(), f"seed={seed} d{name} non-finite"
        err = rel_error(a, b)
        assert err < F32_TOL, f"seed={seed} d{name} err {err:.2e}"


def test_memory_has_no_T_Dk_Dv_intermediate():
    """Peak memory grows with T far slower than one float32 Dv x Dk state per step.

    The growth between T and 2T is what a T x Dk x Dv intermediate would show up in; comparing
    two lengths keeps fixed costs (allocator granularity, kernels' scratch) out of the bound.
    """
    seed = fresh_seed()
    D = 128

    def peak(T):
        x = random_inputs(1, T, 1, 1, D, D, seed=seed, decay="slow")
        mx.eval(x.q, x.k, x.v, x.g, x.beta, x.state)
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        y, s = run(x)
        mx.eval(y, s)
        used = mx.get_peak_memory() - base
        del x, y, s
        return used

    small, large = peak(512), peak(1024)
    per_step = (large - small) / 512
    assert per_step < D * D * 4 / 4, f"seed={seed} peak {small} bytes at T=512, {large} at T=1024"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 2 * CHUNK + 2),
    Hk=st.integers(1, 2),
    ratio=st.integers(1, 4),
    Dk=st.sampled_from([4, 8, 16]),
    Dv=st.sampled_from([4, 8, 12]),
    gate=st.sampled_from(["scalar", "key"]),
    masked=st.booleans(),
    decay=st.sampled_from(["mixed", "slow", "one"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_recurrent(B, T, Hk, ratio, Dk, Dv, gate, masked, decay, seed):
    x = random_inputs(B, T, Hk, Hk * ratio, Dk, Dv, seed=seed, gate=gate, mask=masked, decay=decay)
    y, s = run(x)
    yr, sr = recurrent_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    assert rel_error(y, yr) < F32_TOL and rel_error(s, sr) < F32_TOL, f"seed={seed}"
