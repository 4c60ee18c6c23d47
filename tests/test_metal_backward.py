"""The chunked backward as Metal kernels (mlx_gdn.metal.chunked_backward), through the simulator:
every input's gradient against the ops backward (`ops.chunked_backward.chunked_vjp`) and against
central differences of the float64 reference, with masks, GQA, partial last chunks, float32 and
bfloat16, fused gating, and gates like a trained layer's (including exact zeros)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_gdn
from mlx_gdn import autodiff, fallback, reference
from mlx_gdn.metal import chunked_backward as kb
from mlx_gdn.metal.chunked import CHUNK
from mlx_gdn.ops.chunked_backward import chunked_vjp as ops_vjp
from mlx_gdn.testing import fresh_seed, random_inputs, tolerance
from mlx_gdn.validate import check_rule, check_update

sim = pytest.importorskip("mlx_gdn.sim")
from test_gradients import RULE_INPUTS, _call, _grads, _names, _ops_autodiff, _weights, check_directional  # noqa: E402

GRADS = ("dq", "dk", "dv", "dg", "dbeta", "dstate")


@pytest.fixture
def kernels_only(monkeypatch):
    """The backward must run the Metal kernels: the ops backward refuses, the trial launch that
    could route to it is skipped (`test_trial_passes` runs it), and every launch is recorded by
    its kernel name; the kernels must have launched by the end of the test."""
    launched = []
    real = kb._launch

    def spy(spec, arrays):
        launched.append(spec.name)
        return real(spec, arrays)

    def refuse(*args, **kwargs):
        raise AssertionError("the ops chunked backward ran where the Metal kernels should have")

    monkeypatch.setattr(kb, "_launch", spy)
    monkeypatch.setattr(kb, "_probe", lambda p: None)
    monkeypatch.setattr(autodiff, "chunked_vjp", refuse)
    fallback.clear()
    yield launched
    fallback.clear()
    assert "gdn_chunked_chunk_grads" in launched and "gdn_chunked_state_backward" in launched


def _cotangents(x, seed):
    rng = np.random.default_rng(seed + 3)
    dy = mx.array(rng.standard_normal(x.v.shape).astype(np.float32))
    ds = mx.array(rng.standard_normal(x.state.shape).astype(np.float32))
    return dy, ds


def _compare(got, want, tol, what):
    for name, a, b in zip(GRADS, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {name} {a.shape} {a.dtype}, ops {b.shape} {b.dtype}"
        an = reference.to_numpy(a)
        assert np.isfinite(an).all(), f"{what}: non-finite {name}"
        err = reference.rel_error(an, b)
        assert err < tol, f"{what}: {name} relative error {err:.2e} against the ops backward (bound {tol:.0e})"


# (Hk, Hv, Dk, Dv, B, T): GQA 2 and 4 value heads per key head, Dk = Dv in {32, 64}, partial last
# chunks (45 = 32 + 13, 77 = 2 * 32 + 13) and whole chunks only.
SHAPES = [(1, 2, 32, 32, 2, 45), (2, 4, 64, 64, 1, 77), (1, 4, 32, 32, 1, 2 * CHUNK)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"Hk{s[0]}Hv{s[1]}D{s[2]}T{s[5]}" for s in SHAPES])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_vjp_matches_ops_backward(kernels_only, shape, dtype, masked):
    """chunked_vjp's six gradients against the ops backward on the same inputs and cotangents."""
    Hk, Hv, Dk, Dv, B, T = shape
    seed = fresh_seed()
    x = random_inputs(B, T, Hk, Hv, Dk, Dv, dtype=dtype, seed=seed, mask=masked)
    dy, ds = _cotangents(x, seed)
    args = (x.q, x.k, x.v, x.g, x.beta, x.state, x.mask, dy.astype(dtype), ds)
    p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    assert kb.supports(p)
    with sim.simulated_metal():
        got = kb.chunked_vjp(p, *args)
        mx.eval(got)
    _compare(got, ops_vjp(*args), tolerance(dtype), f"seed={seed} {shape} {dtype}")
    assert set(kernels_only) == {s.name for s in kb.launch_specs_backward(p) if s is not None}


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["rule", "update"])
def test_gradients_match_reference(kernels_only, dtype, fused):
    """Every input's gradient through the public entry point (q, k, v, g, beta, state; or a, b,
    A_log, dt_bias through fused gating) by central differences of the float64 reference along
    random directions, with masks and GQA; the kernels launched and the ops backward did not run."""
    seed = fresh_seed()
    x = random_inputs(2, 45, 1, 2, 32, 32, dtype=dtype, seed=seed, mask=True)
    # One slowly decaying head, so the initial state still reaches the outputs.
    x.A_log = mx.concatenate([mx.array([np.log(0.05)], dtype=x.A_log.dtype), x.A_log[1:]])
    W, V = _weights(x, seed)
    with sim.simulated_metal():
        grads = _grads(_call(x, fused, "metal", "chunked"), x, fused, W, V)
    assert "gdn_chunked_chunk_grads" in kernels_only and "gdn_chunked_state_backward" in kernels_only
    for n, g in grads.items():
        assert g.dtype == getattr(x, n).dtype, f"d{n} dtype {g.dtype}"
        assert float(mx.abs(g).max()) > 0, f"seed={seed}: d{n} is all zero"
    tol = 1e-4 if dtype == mx.float32 else tolerance(dtype)
    check_directional(grads, x, fused, W, V, seed, f"metal chunked backward {dtype}", tol=tol)


@pytest.mark.parametrize("lower_bound,neg", [(None, True), (-5.0, False)])
def test_fused_gating_options_match_ops(kernels_only, monkeypatch, lower_bound, neg):
    """lower_bound and allow_neg_eigval: a, b, A_log, dt_bias gradients equal the ops path's."""
    seed = fresh_seed()
    x = random_inputs(1, 70, 2, 4, 32, 32, seed=seed, mask=True)
    W, V = _weights(x, seed)
    with sim.simulated_metal():
        got = _grads(_call(x, True, "metal", "chunked", lower_bound, neg), x, True, W, V)
    monkeypatch.undo()  # the ops path's own backward, for comparison
    want = _grads(_call(x, True, "ops", "chunked", lower_bound, neg), x, True, W, V)
    for n in _names(True):
        err = reference.rel_error(got[n], want[n])
        assert err < 1e-4, f"seed={seed} lb={lower_bound} neg={neg}: d{n} relative error {err:.2e}"


@pytest.mark.parametrize("fused", [False, True], ids=["rule", "update"])
def test_masked_steps_get_zero_gradient(kernels_only, fused):
    """A masked step's q, k, v, g, beta (a, b) get exactly zero gradient (a key head's too, under
    GQA), including a gap across a chunk boundary and a masked last step."""
    seed = fresh_seed()
    x = random_inputs(2, CHUNK + 20, 1, 2, 32, 32, seed=seed)
    m = np.ones((2, CHUNK + 20), bool)
    m[0, CHUNK - 3:CHUNK + 4] = False
    m[1, -1] = False
    m[1, 5] = False
    x.mask = mx.array(m)
    W, V = _weights(x, seed)
    with sim.simulated_metal():
        grads = _grads(_call(x, fused, "metal", "chunked"), x, fused, W, V)
    for n in ("q", "k", "v") + (("a", "b") if fused else ("g", "beta")):
        gr = reference.to_numpy(grads[n])
        assert (gr[~m] == 0).all(), f"seed={seed}: d{n} nonzero on a masked step"
        assert np.abs(gr[m]).max() > 0, f"seed={seed}: d{n} zero everywhere"


def test_trained_gates_and_exact_zeros(kernels_only, monkeypatch):
    """Gates like a trained layer's (fused, some decays underflowing to exactly 0): no NaN, and the
    ops path's gradients; precomputed gates of exactly 0, 1e-30 and 1: the gradients of autodiff
    through the exact recurrence (dg at g = 0 included)."""
    seed = fresh_seed()
    x = random_inputs(1, 2 * CHUNK + 7, 1, 2, 32, 32, seed=seed)
    a = reference.to_numpy(x.a).copy()
    a[0, 4::11] = 400.0  # exp(-rate * softplus(400)) underflows to 0 (rate >= 0.5)
    x.a = mx.array(a.astype(np.float32))
    W, V = _weights(x, seed)
    g = np.array(x.g)
    g[0, 3::9], g[0, 5::9], g[0, 7::9] = 0.0, 1e-30, 1.0
    xg = random_inputs(1, 2 * CHUNK + 7, 1, 2, 32, 32, seed=seed)
    xg.g = mx.array(g)
    with sim.simulated_metal():
        fused = _grads(_call(x, True, "metal", "chunked"), x, True, W, V)
        got = _grads(_call(xg, False, "metal", "chunked"), xg, False, W, V)
    monkeypatch.undo()  # the ops path's own backward, for comparison
    fused_ops = _grads(_call(x, True, "ops", "chunked"), x, True, W, V)
    for n, gr in fused.items():
        assert np.isfinite(reference.to_numpy(gr)).all(), f"seed={seed}: non-finite d{n}"
        err = reference.rel_error(gr, fused_ops[n])
        assert err < 1e-4, f"seed={seed}: fused d{n} relative error {err:.2e} against the ops path"
    want = _ops_autodiff(xg, W, V)
    assert float(mx.abs(want["g"][0, 3::9]).max()) > 0
    for n in RULE_INPUTS:
        err = reference.rel_error(got[n], want[n])
        assert err < 1e-4, f"seed={seed}: d{n} relative error {err:.2e}"


def test_no_state_and_no_state_cotangent(kernels_only, monkeypatch):
    """state=None (zeros), a loss of y alone, and a single partial chunk: as the ops backward."""
    seed = fresh_seed()
    x = random_inputs(1, 20, 1, 2, 32, 32, seed=seed, with_state=False)
    W = mx.array(np.random.default_rng(seed).standard_normal(x.v.shape).astype(np.float32))

    def loss(backend):
        def f(q, k, v, g, beta):
            y, _ = mlx_gdn.gated_delta_rule(q, k, v, g, beta, None, backend=backend, algorithm="chunked")
            return (y * W).sum()
        return mx.grad(f, argnums=(0, 1, 2, 3, 4))(x.q, x.k, x.v, x.g, x.beta)

    with sim.simulated_metal():
        got = loss("metal")
        mx.eval(got)
    monkeypatch.undo()  # the ops path's own backward, for comparison
    want = loss("ops")
    for n, a, b in zip(("q", "k", "v", "g", "beta"), got, want):
        err = reference.rel_error(a, b)
        assert err < 1e-4, f"seed={seed}: d{n} relative error {err:.2e}"


def test_per_key_gates_keep_the_ops_backward():
    x = random_inputs(1, 40, 1, 2, 32, 32, gate="key")
    assert not kb.supports(check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask))
    x = random_inputs(1, 40, 1, 2, 32, 32, fused_gate="key")
    p = check_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, None, None, False)
    assert not kb.supports(p)


def test_failing_kernels_fall_back_with_a_warning(monkeypatch):
    """A kernel variant set whose trial fails (here: it raises) gives the ops backward's result,
    with one RuntimeWarning naming the kernels."""
    seed = fresh_seed()
    x = random_inputs(1, 40, 1, 2, 32, 32, seed=seed, mask=True)
    dy, ds = _cotangents(x, seed)
    args = (x.q, x.k, x.v, x.g, x.beta, x.state, x.mask, dy, ds)
    p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)

    def broken(*a, **k):
        raise RuntimeError("planted compile failure")

    monkeypatch.setattr(kb, "kernel_vjp", broken)
    fallback.clear()
    try:
        with sim.simulated_metal(), pytest.warns(RuntimeWarning, match="gdn_chunked_chunk_grads.*planted compile failure") as rec:
            got = kb.chunked_vjp(p, *args)
            kb.chunked_vjp(p, *args)
    finally:
        fallback.clear()
    assert sum("Metal chunked backward" in str(w.message) for w in rec) == 1, "warned more than once"
    _compare(got, ops_vjp(*args), 1e-6, f"seed={seed} fallback")


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_trial_passes(dtype):
    """The first call's trial launch (against the ops backward) accepts the kernels."""
    x = random_inputs(2, 45, 1, 2, 32, 32, dtype=dtype, mask=True)
    p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    with sim.simulated_metal():
        assert kb._probe(p) is None
