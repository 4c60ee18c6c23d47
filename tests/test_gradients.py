"""Gradients through both public entry points, on every backend x algorithm.

Each path's gradient is checked by directional derivatives against the float64 reference: for
L = sum(y * W) + sum(state * V) with random W, V, the central difference of the reference along
a random direction D of one input X against <dL/dX, D>. Kernel paths run in the simulators
(`simulated_metal()`, `simulated_cuda()`), which raise on differentiation as MLX's kernels do,
so a kernel path without its own VJP cannot pass by returning zeros.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np
import pytest

import mlx_gdn
from mlx_gdn import backends, reference
from mlx_gdn.ops import backend as ops_backend
from mlx_gdn.ops.recurrent import recurrent_rule
from mlx_gdn.testing import (RULE_INPUTS, TOLERANCE, UPDATE_INPUTS, directional_derivatives, fresh_seed,
                             loss_weights, random_inputs)
from mlx_gdn.validate import check_rule, check_update

sim = pytest.importorskip("mlx_gdn.sim")


# (backend, algorithm, simulator, (Dk, Dv)): every path that runs a kernel of its own, and the ops
# paths, at the smallest head sizes each kernel takes (recurrent bodies: Dk a multiple of 32;
# CUDA tensor-core kernels: Dk, Dv in {64, 128, ...}).
PATHS = [
    ("ops", "recurrent", None, (8, 8)),
    ("ops", "chunked", None, (8, 8)),
    ("metal", "recurrent", "metal", (32, 8)),
    ("metal", "chunked", "metal", (8, 8)),
    ("cuda", "chunked", "cuda", (64, 64)),
]


def _simulator(name):
    if name is None:
        import contextlib

        return contextlib.nullcontext()
    return sim.simulated_metal() if name == "metal" else sim.simulated_cuda()


def _call(x, fused, backend, algorithm, lower_bound=None, neg=False):
    """(y, state) from the public entry point; fused picks gated_delta_update."""
    if fused:
        return lambda q, k, v, a, b, A_log, dt_bias, state: mlx_gdn.gated_delta_update(
            q, k, v, a, b, A_log, dt_bias, state, x.mask,
            lower_bound=lower_bound, allow_neg_eigval=neg, backend=backend, algorithm=algorithm,
        )
    return lambda q, k, v, g, beta, state: mlx_gdn.gated_delta_rule(
        q, k, v, g, beta, state, x.mask, backend=backend, algorithm=algorithm
    )


def _names(fused):
    return UPDATE_INPUTS if fused else RULE_INPUTS


def _grads(fn, x, fused, W, V):
    """dL/dX for every input X of `fn`, L = sum(y W) + sum(state V)."""
    names = _names(fused)

    def loss(*args):
        y, s = fn(*args)
        return (y.astype(mx.float32) * W).sum() + (s * V).sum()

    grads = mx.grad(loss, argnums=tuple(range(len(names))))(*(getattr(x, n) for n in names))
    mx.eval(grads)
    return dict(zip(names, grads))


def check_directional(grads, x, fused, W, V, seed, what, lower_bound=None, neg=False, eps=1e-5, tol=1e-4):
    """<dL/dX, D> against the central difference of the float64 reference, per input X
    (`mlx_gdn.testing.directional_derivatives`)."""
    inputs = {n: getattr(x, n) for n in _names(fused)}
    for n, (predicted, fd, scale) in directional_derivatives(grads, inputs, x.mask, W, V, seed, lower_bound, neg,
                                                             eps).items():
        assert np.isfinite(reference.to_numpy(grads[n])).all(), f"{what}, seed={seed}: d{n} non-finite"
        assert abs(fd) > 1e-6 * scale, f"{what}, seed={seed}: d{n} is a degenerate check (fd {fd})"
        assert abs(predicted - fd) <= tol * scale, (
            f"{what}, seed={seed}: <dL/d{n}, D> = {predicted:.8g}, reference central difference {fd:.8g}"
        )


_weights = loss_weights


def _assert_routed(x, fused, backend, algorithm, lower_bound=None, neg=False):
    """The forward really runs on `backend` (no silent fallback to ops)."""
    if fused:
        p = check_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask, lower_bound, neg)
    else:
        p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    mod, algo = backends.resolve(backend, algorithm, p)
    assert (mod.name, algo) == (backend, algorithm), f"{backend}/{algorithm} resolved to {mod.name}/{algo}"


# --- the simulators behave as MLX's kernels under differentiation -------------------------------


def _doubling_kernel(which):
    if which == "metal":
        return mx.fast.metal_kernel(
            name="twice", input_names=["x"], output_names=["o"],
            source="uint i = thread_position_in_grid.x; o[i] = 2.0f * x[i];",
        )
    return mx.fast.cuda_kernel(
        name="twice", input_names=["x"], output_names=["o"],
        source="int i = threadIdx.x; o[i] = 2.0f * x[i];",
    )


@pytest.mark.parametrize("which", ["metal", "cuda"])
def test_simulated_kernels_have_no_vjp(which):
    """A kernel from a simulator raises under mx.grad / mx.vjp / mx.jvp, naming the kernel, where
    its outputs would otherwise be constants (gradients all zero, no error)."""
    x = mx.arange(32, dtype=mx.float32) / 7.0
    with _simulator(which):
        kern = _doubling_kernel(which)

        def f(x):
            return kern(inputs=[x], output_shapes=[x.shape], output_dtypes=[x.dtype],
                        grid=(32, 1, 1), threadgroup=(32, 1, 1))[0]

        np.testing.assert_allclose(np.array(f(x)), 2 * np.array(x), rtol=1e-6)  # the forward still runs
        with pytest.raises(ValueError, match=r"\[Primitive::vjp\] Not implemented for CustomKernel.*'twice'"):
            mx.eval(mx.grad(lambda x: f(x).sum())(x))
        with pytest.raises(ValueError, match=r"\[Primitive::vjp\] Not implemented for CustomKernel.*'twice'"):
            mx.eval(mx.vjp(f, [x], [mx.ones_like(x)])[1])
        with pytest.raises(ValueError, match=r"\[Primitive::jvp\] Not implemented for CustomKernel"):
            mx.eval(mx.jvp(f, [x], [mx.ones_like(x)])[1])
        # Differentiating with respect to something else leaves the kernel alone.
        y = mx.array(3.0)
        assert float(mx.grad(lambda y: (f(x) * y).sum())(y)) == pytest.approx(float((2 * x).sum()), rel=1e-5)


# --- every path against the float64 reference --------------------------------------------------


@pytest.mark.parametrize("backend,algorithm,simulator,D", PATHS, ids=[f"{b}-{a}" for b, a, _, _ in PATHS])
@pytest.mark.parametrize("fused", [False, True], ids=["rule", "update"])
def test_gradients_match_reference(backend, algorithm, simulator, D, fused, monkeypatch):
    """Every input's gradient on every backend x algorithm, GQA (Hk < Hv), masked steps, an
    initial state and more than one chunk (T=45 > 32 steps per chunk on the CPU)."""
    seed = fresh_seed()
    B, T = (1, 40) if backend == "cuda" else (2, 45)
    x = random_inputs(B, T, 1, 2, *D, seed=seed, mask=True)
    # Head 0 decays slowly, so the initial state still reaches the outputs after T steps (with a
    # trained layer's rates in every head it can vanish below float64, and its check be empty).
    x.A_log = mx.concatenate([mx.array([np.log(0.05)], dtype=x.A_log.dtype), x.A_log[1:]])
    W, V = _weights(x, seed)
    what = f"{backend}/{algorithm} {'update' if fused else 'rule'}"
    with _simulator(simulator):
        _assert_routed(x, fused, backend, algorithm)
        if backend != "ops":
            # The forward must run the kernel, not fall back to the ops backend.
            monkeypatch.setattr(ops_backend, "run", lambda *a, **k: pytest.fail(f"{what}: ran on ops"))
        grads = _grads(_call(x, fused, backend, algorithm), x, fused, W, V)
    for n, gr in grads.items():
        assert float(mx.abs(gr).max()) > 0, f"{what}, seed={seed}: d{n} is all zero"
    check_directional(grads, x, fused, W, V, seed, what)


@pytest.mark.parametrize("lower_bound,neg", [(None, True), (-5.0, False), (-5.0, True)])
@pytest.mark.parametrize("backend,algorithm,simulator", [("ops", "chunked", None), ("metal", "recurrent", "metal")])
def test_fused_gating_options(backend, algorithm, simulator, lower_bound, neg):
    """lower_bound and allow_neg_eigval chain through the gate math into a, b, A_log, dt_bias."""
    seed = fresh_seed()
    x = random_inputs(1, 37, 2, 4, 32, 8, seed=seed)
    W, V = _weights(x, seed)
    with _simulator(simulator):
        _assert_routed(x, True, backend, algorithm, lower_bound, neg)
        grads = _grads(_call(x, True, backend, algorithm, lower_bound, neg), x, True, W, V)
    check_directional(grads, x, True, W, V, seed, f"{backend}/{algorithm} lb={lower_bound} neg={neg}", lower_bound, neg)


@pytest.mark.parametrize("backend,algorithm,simulator", [
    ("ops", "recurrent", None), ("ops", "chunked", None), ("metal", "recurrent", "metal"),
])
def test_per_key_gates(backend, algorithm, simulator):
    """g [B, T, Hv, Dk]: its gradient has the Dk axis and matches the reference."""
    seed = fresh_seed()
    x = random_inputs(1, 40, 1, 2, 32, 8, seed=seed, gate="key", mask=True)
    W, V = _weights(x, seed)
    with _simulator(simulator):
        _assert_routed(x, False, backend, algorithm)
        grads = _grads(_call(x, False, backend, algorithm), x, False, W, V)
    assert grads["g"].shape == x.g.shape
    check_directional(grads, x, False, W, V, seed, f"{backend}/{algorithm} per-key gate")


@pytest.mark.parametrize("A_log_shape", ["[Hv]", "[Hv, 1]"])
@pytest.mark.parametrize("backend,algorithm,simulator", [
    ("ops", "recurrent", None), ("ops", "chunked", None), ("metal", "recurrent", "metal"),
])
def test_fused_per_key_gates(backend, algorithm, simulator, A_log_shape):
    """Kimi-style fused gating, a [B, T, Hv, Dk] and dt_bias [Hv, Dk] (A_log [Hv] or mlx-lm's
    [Hv, 1]): gradients of a, b, A_log, dt_bias in their own shapes, against the reference."""
    seed = fresh_seed()
    x = random_inputs(1, 40, 1, 2, 32, 8, seed=seed, fused_gate="key", mask=True)
    if A_log_shape == "[Hv, 1]":
        x.A_log = x.A_log.reshape(-1, 1)
    W, V = _weights(x, seed)
    with _simulator(simulator):
        _assert_routed(x, True, backend, algorithm)
        grads = _grads(_call(x, True, backend, algorithm), x, True, W, V)
    for n in ("a", "A_log", "dt_bias"):
        assert grads[n].shape == getattr(x, n).shape, f"d{n} shape {grads[n].shape}"
    check_directional(grads, x, True, W, V, seed, f"{backend}/{algorithm} fused per-key gates")


# --- against the ops path's autodiff ------------------------------------------------------------


def _ops_autodiff(x, W, V):
    """Gradients by MLX autodiff through the exact ops recurrence (no custom VJP on the way)."""
    fn = lambda q, k, v, g, beta, s: recurrent_rule(q, k, v, g, beta, s, x.mask)  # noqa: E731
    return _grads(fn, x, False, W, V)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("backend,algorithm,simulator,D", PATHS, ids=[f"{b}-{a}" for b, a, _, _ in PATHS])
def test_gradients_match_ops_autodiff(backend, algorithm, simulator, D, dtype):
    """The same gradients as autodiff through the ops recurrence, in float32 and bfloat16."""
    seed = fresh_seed()
    x = random_inputs(1, 36, 2, 4, *D, seed=seed, dtype=dtype, mask=True)
    W, V = _weights(x, seed)
    with _simulator(simulator):
        got = _grads(_call(x, False, backend, algorithm), x, False, W, V)
    want = _ops_autodiff(x, W, V)
    tol = 1e-4 if dtype == mx.float32 else 2e-2
    for n in RULE_INPUTS:
        assert got[n].dtype == getattr(x, n).dtype, f"d{n} dtype {got[n].dtype}"
        err = reference.rel_error(got[n], want[n])
        assert err < tol, f"{backend}/{algorithm} {dtype}, seed={seed}: d{n} relative error {err:.2e}"


@pytest.mark.parametrize("backend,algorithm,simulator,D", PATHS[:3], ids=[f"{b}-{a}" for b, a, _, _ in PATHS[:3]])
def test_extreme_gates(backend, algorithm, simulator, D):
    """Gates of exactly 0, 1e-30 and 1 among ordinary ones: every gradient (dg at g = 0 too, where
    log g is -inf) equals autodiff through the exact recurrence."""
    seed = fresh_seed()
    x = random_inputs(1, 40, 1, 2, *D, seed=seed)
    g = np.array(x.g)
    g[0, 3::9], g[0, 5::9], g[0, 7::9] = 0.0, 1e-30, 1.0
    x.g = mx.array(g)
    W, V = _weights(x, seed)
    with _simulator(simulator):
        got = _grads(_call(x, False, backend, algorithm), x, False, W, V)
    want = _ops_autodiff(x, W, V)
    assert float(mx.abs(want["g"][0, 3::9]).max()) > 0
    for n in RULE_INPUTS:
        err = reference.rel_error(got[n], want[n])
        assert err < 1e-4, f"{backend}/{algorithm}, seed={seed}: d{n} relative error {err:.2e}"


@pytest.mark.parametrize("group", [0, 1, 2, 3])
@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_backward_in_groups_of_chunks(group, gate, monkeypatch):
    """The chunk-local gradients formed for all chunks at once (group 0) or a few chunks at a time
    (the last group shorter) give the VJP of autodiff through the exact recurrence."""
    from mlx_gdn.ops import chunked_backward
    from mlx_gdn.ops.chunked import chunk_len

    seed = fresh_seed()
    T = 4 * chunk_len() + 22  # five chunks
    x = random_inputs(2, T, 1, 2, 16, 8, seed=seed, gate=gate, mask=True)
    W, V = _weights(x, seed)
    monkeypatch.setattr(chunked_backward, "GROUP", group)
    got = _grads(_call(x, False, "ops", "recurrent"), x, False, W, V)
    want = _ops_autodiff(x, W, V)
    for n in RULE_INPUTS:
        err = reference.rel_error(got[n], want[n])
        assert err < 1e-5, f"group {group}, seed={seed}: d{n} relative error {err:.2e}"


# --- properties --------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
def test_masked_steps_get_no_gradient(algorithm):
    """A masked step's q, k, v, g, beta (and a, b) get exactly zero gradient, whatever W weighs
    its (zero) output with."""
    seed = fresh_seed()
    x = random_inputs(2, 30, 1, 2, 8, 8, seed=seed, mask=True)
    W, V = _weights(x, seed)
    m = np.array(x.mask)
    assert (~m).any()
    for fused in (False, True):
        grads = _grads(_call(x, fused, "ops", algorithm), x, fused, W, V)
        for n in _names(fused):
            if n in ("A_log", "dt_bias", "state"):
                continue
            gr = np.array(grads[n].astype(mx.float32))
            assert (gr[~m] == 0).all(), f"seed={seed}: d{n} nonzero at a masked step"
            assert np.abs(gr[m]).max() > 0, f"seed={seed}: d{n} zero at every kept step"


def test_gqa_gradients_sum_over_value_heads():
    """With Hv = 2 Hk, the gradient of a shared key head is the sum of those of its value heads:
    the same as with each key head repeated per value head (Hk = Hv) and summed."""
    seed = fresh_seed()
    x = random_inputs(1, 40, 2, 4, 8, 8, seed=seed)
    W, V = _weights(x, seed)
    got = _grads(_call(x, False, "ops", "chunked"), x, False, W, V)
    x_rep = random_inputs(1, 40, 2, 4, 8, 8, seed=seed)
    x_rep.q, x_rep.k = mx.repeat(x.q, 2, axis=2), mx.repeat(x.k, 2, axis=2)
    rep = _grads(_call(x_rep, False, "ops", "chunked"), x_rep, False, W, V)
    for n in ("q", "k"):
        summed = rep[n].reshape(1, 40, 2, 2, 8).sum(3)
        err = reference.rel_error(got[n], summed)
        assert err < 1e-5, f"seed={seed}: d{n} {err:.2e}"


@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
def test_no_initial_state(algorithm):
    """state=None (zeros): every other input still gets its gradient, through the final state too."""
    seed = fresh_seed()
    x = random_inputs(1, 20, 1, 2, 8, 8, seed=seed)
    W, V = _weights(x, seed)
    x.state = mx.zeros_like(x.state)
    want = _grads(_call(x, False, "ops", algorithm), x, False, W, V)

    def loss(q, k, v, g, beta):
        y, s = mlx_gdn.gated_delta_rule(q, k, v, g, beta, None, backend="ops", algorithm=algorithm)
        return (y * W).sum() + (s * V).sum()

    got = mx.grad(loss, argnums=(0, 1, 2, 3, 4))(x.q, x.k, x.v, x.g, x.beta)
    for n, gr in zip(RULE_INPUTS, got):
        assert reference.rel_error(gr, want[n]) < 1e-6, f"seed={seed}: d{n}"


def test_peak_memory_linear_in_T():
    """Forward and backward at T=4096 keep one state per chunk, not per step: the peak stays
    well below the size of the per-step states (T * Hv * Dv * Dk floats, 268 MB here) that
    autodiff through the recurrence keeps (its peak: 3.5 GB). Measured on the CPU: 113 MB."""
    if mx.default_device().type != mx.cpu:
        pytest.skip("measured on the CPU")
    seed = fresh_seed()
    B, T, Hk, Hv, D = 1, 4096, 2, 4, 64
    x = random_inputs(B, T, Hk, Hv, D, D, seed=seed)
    W, V = _weights(x, seed)
    args = (x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state)
    mx.eval(args, W, V)
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t0 = time.perf_counter()
    grads = _grads(_call(x, True, "ops", "chunked"), x, True, W, V)
    seconds = time.perf_counter() - t0
    peak = mx.get_peak_memory() - base
    per_step_states = T * Hv * D * D * 4
    assert all(float(mx.abs(g).max()) > 0 for g in grads.values())
    assert peak < 0.6 * per_step_states, f"peak {peak / 1e6:.0f} MB in {seconds:.1f} s (per-step states {per_step_states / 1e6:.0f} MB)"


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_ops_recurrence_below_the_crossover_is_differentiated_directly(dtype, monkeypatch):
    """Below the ops backend's chunked crossover the recurrence's own autodiff gives the gradient
    (it keeps the forward's steps, as mlx-lm's autodiff does); from the crossover on, the chunked
    backward does (one state per chunk). Both against the float64 reference."""
    from mlx_gdn import autodiff

    t0 = backends.chunked_from("ops", dtype)
    used = []
    real = autodiff.chunked_vjp
    monkeypatch.setattr(autodiff, "chunked_vjp", lambda *a: used.append(1) or real(*a))
    for T, chunked in ((t0 - 1, False), (t0, True)):
        used.clear()
        seed = fresh_seed()
        x = random_inputs(1, T, 1, 2, 32, 32, dtype=dtype, seed=seed, mask=True)
        x.A_log = mx.concatenate([mx.array([np.log(0.05)], dtype=x.A_log.dtype), x.A_log[1:]])
        W, V = _weights(x, seed)
        what = f"ops/recurrent {dtype} T={T}"
        grads = _grads(_call(x, False, "ops", "recurrent"), x, False, W, V)
        check_directional(grads, x, False, W, V, seed, what, tol=TOLERANCE[dtype])
        assert bool(used) == chunked, f"{what}: chunked backward ran {len(used)} times (seed={seed})"


# --- through a whole model ----------------------------------------------------------------------


@pytest.mark.parametrize("backend,simulator", [("ops", None), ("metal", "metal")])
def test_tiny_qwen3_5_training_through_the_chosen_backend(backend, simulator, monkeypatch):
    """A tiny mlx-lm Qwen3.5 in training mode, patched for `backend`, runs its GatedDeltaNet layers
    on that backend (the Metal kernels in the simulator) and has the same loss and the same
    gradient on every trainable parameter as the unpatched model, over more than one chunk."""
    pytest.importorskip("mlx_lm")
    import copy

    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from test_module import gdn_layers, tiny_model, tokens

    seed = fresh_seed()
    model = tiny_model("qwen3_5", seed)
    model.train()
    patched = copy.deepcopy(model)
    toks = tokens(seed, (2, 41))

    def loss(m):
        return nn.losses.cross_entropy(m(toks[:, :-1]), toks[:, 1:]).mean()

    l_ref, g_ref = nn.value_and_grad(model, loss)(model)
    runs = []
    mod = backends.module(backend)
    real_run = mod.run
    monkeypatch.setattr(mod, "run", lambda p, *a, **k: runs.append(p.T) or real_run(p, *a, **k))
    with _simulator(simulator):
        assert mlx_gdn.patch(patched, backend=backend) == 3
        assert all(l.training for l in gdn_layers(patched))
        l_new, g_new = nn.value_and_grad(patched, loss)(patched)
        mx.eval(l_new, g_new)
    assert runs == [40] * 3, runs
    assert abs(float(l_ref) - float(l_new)) < 1e-5 * abs(float(l_ref)), f"seed={seed}"
    ref, new = dict(tree_flatten(g_ref)), dict(tree_flatten(g_new))
    assert ref.keys() == new.keys()
    assert any(float(mx.abs(ref[k]).max()) > 0 for k in ref if "linear_attn" in k)
    for name in ref:
        err = reference.rel_error(new[name], ref[name])
        assert err < 1e-4, f"seed={seed}: {name} gradient relative error {err:.2e}"


# --- on a real NVIDIA GPU -------------------------------------------------------------------------


def _has_cuda() -> bool:
    from mlx_gdn.cuda.backend import available

    return bool(available()) and mx.default_device().type == mx.gpu and not sim.cuda_active()


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs MLX with a CUDA device")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["rule", "update"])
@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
def test_cuda_gradients_match_reference(algorithm, fused, dtype):
    """The CUDA kernels' forward with the chunked backward, at Qwen3.5's head sizes, several chunks,
    GQA and masks: directional derivatives against the float64 reference (float32: the ops
    chunked form's bound on this device, TF32 products included; bfloat16: 2e-2)."""
    from mlx_gdn.ops.chunked import float32_tolerance

    seed = fresh_seed()
    x = random_inputs(2, 150, 2, 4, 128, 128, seed=seed, dtype=dtype, mask=True)
    W, V = _weights(x, seed)
    _assert_routed(x, fused, "cuda", algorithm)
    grads = _grads(_call(x, fused, "cuda", algorithm), x, fused, W, V)
    tol = float32_tolerance() if dtype == mx.float32 else 2e-2
    check_directional(grads, x, fused, W, V, seed, f"cuda/{algorithm} {dtype}", tol=tol)
