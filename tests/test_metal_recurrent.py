"""Recurrent Metal kernels (decode and prefill bodies) through the simulator, against float64."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_gdn
from mlx_gdn import launch, reference
from mlx_gdn.metal import backend as metal
from mlx_gdn.metal import kernel as metal_kernel
from mlx_gdn.ops import backend as ops_backend
from mlx_gdn.testing import fresh_seed, random_inputs, tolerance
from mlx_gdn.validate import Problem, check_rule, check_update

sim = pytest.importorskip("mlx_gdn.sim")
simulated_metal = getattr(sim, "simulated_metal", None)
if simulated_metal is None:  # pragma: no cover - until the simulator lands
    pytest.skip("mlx_gdn.sim.simulated_metal is not available", allow_module_level=True)

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16


def tol(dtype) -> float:
    return tolerance(dtype)


@pytest.fixture
def no_ops(monkeypatch):
    """Fail if a call meant for the kernels falls back to the ops backend."""

    def refuse(*args, **kwargs):
        raise AssertionError("the ops backend ran where a Metal kernel should have")

    monkeypatch.setattr(ops_backend, "run", refuse)


def _inputs(B, T, Hk, Hv, Dk, Dv, dtype, seed, *, gate="scalar", mask=False, decay="mixed", int_mask=False,
            fused_gate="scalar"):
    x = random_inputs(B, T, Hk, Hv, Dk, Dv, dtype=dtype, seed=seed, gate=gate, mask=mask, decay=decay,
                      fused_gate=fused_gate)
    if int_mask and x.mask is not None:
        x.mask = x.mask.astype(mx.int32)
    return x


def _check(y, state, y_ref, s_ref, dtype, what):
    assert y.dtype == dtype and state.dtype == F32, what
    ey, es = reference.rel_error(y, y_ref), reference.rel_error(state, s_ref)
    assert ey < tol(dtype) and es < tol(dtype), f"{what}: rel error y {ey:.2e}, state {es:.2e}"


def run_rule(x, **kw):
    with simulated_metal():
        y, s = mlx_gdn.gated_delta_rule(
            x.q, x.k, x.v, x.g, x.beta, x.state, x.mask, backend="metal", algorithm="recurrent", **kw
        )
        mx.eval(y, s)
    return y, s


def run_update(x, lower_bound=None, neg=False):
    with simulated_metal():
        y, s = mlx_gdn.gated_delta_update(
            x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask,
            lower_bound=lower_bound, allow_neg_eigval=neg, backend="metal", algorithm="recurrent",
        )
        mx.eval(y, s)
    return y, s


def ref_update(x, lower_bound=None, neg=False):
    g, beta = reference.gates(x.a, x.b, x.A_log, x.dt_bias, lower_bound, neg)
    return reference.delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)


# (B, T, Hk, Hv, Dk, Dv, dtype, gate, masked). T <= launch.DECODE_MAX_T runs the decode body,
# longer T the prefill body; T = 21 with per-key gates crosses staged-block boundaries.
RULE_CASES = [
    (1, 1, 2, 6, 32, 32, F32, "scalar", False),
    (2, 7, 2, 4, 64, 64, F32, "scalar", True),
    (1, 3, 1, 2, 128, 128, BF16, "key", False),
    (1, 21, 1, 3, 128, 64, F16, "key", True),
    (1, 5, 1, 1, 192, 96, F32, "scalar", False),
    (1, 2, 1, 1, 256, 256, F32, "scalar", True),
    (1, 9, 2, 2, 256, 192, BF16, "scalar", False),
    (2, 6, 1, 4, 96, 40, F32, "key", False),
    (1, 1, 1, 1, 512, 8, F32, "scalar", False),
    (1, 5, 1, 1, 512, 8, BF16, "key", True),
]


@pytest.mark.parametrize("case", RULE_CASES, ids=lambda c: "B{}T{}Hk{}Hv{}Dk{}Dv{}-{}-{}{}".format(
    *c[:6], str(c[6]).split(".")[-1], c[7], "-mask" if c[8] else ""))
def test_rule_matches_reference(case, no_ops):
    B, T, Hk, Hv, Dk, Dv, dtype, gate, masked = case
    seed = fresh_seed()
    x = _inputs(B, T, Hk, Hv, Dk, Dv, dtype, seed, gate=gate, mask=masked)
    y, s = run_rule(x)
    y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    _check(y, s, y_ref, s_ref, dtype, f"seed {seed}, case {case}")


# (B, T, Hk, Hv, Dk, Dv, dtype, masked, lower_bound, allow_neg_eigval)
UPDATE_CASES = [
    (1, 1, 1, 2, 128, 128, BF16, False, None, False),
    (2, 4, 1, 1, 64, 32, F32, True, -5.0, True),
    (1, 11, 2, 4, 64, 64, F32, False, None, True),
    (2, 13, 1, 2, 128, 64, F16, True, -0.5, False),
]


@pytest.mark.parametrize("case", UPDATE_CASES, ids=lambda c: "B{}T{}Hk{}Hv{}Dk{}Dv{}-{}{}-lb{}-neg{}".format(
    *c[:6], str(c[6]).split(".")[-1], "-mask" if c[7] else "", c[8], int(c[9])))
def test_update_matches_reference(case, no_ops):
    B, T, Hk, Hv, Dk, Dv, dtype, masked, lower_bound, neg = case
    seed = fresh_seed()
    x = _inputs(B, T, Hk, Hv, Dk, Dv, dtype, seed, mask=masked)
    y, s = run_update(x, lower_bound, neg)
    y_ref, s_ref = ref_update(x, lower_bound, neg)
    _check(y, s, y_ref, s_ref, dtype, f"seed {seed}, case {case}")


@pytest.mark.parametrize("lower_bound", [None, -3.0])
def test_fused_gates_at_extremes(lower_bound, no_ops):
    """a far out on both sides (softplus's two tails, g near 0 and exactly 1) and |b| large."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    x = _inputs(1, 6, 1, 2, 32, 32, F32, seed, decay="one")
    a = rng.choice([-60.0, -20.0, -1e-3, 0.0, 15.0, 40.0], size=(1, 6, 2))
    b = rng.choice([-30.0, -3.0, 0.0, 4.0, 30.0], size=(1, 6, 2))
    x.a, x.b = mx.array(a.astype(np.float32)), mx.array(b.astype(np.float32))
    y, s = run_update(x, lower_bound)
    y_ref, s_ref = ref_update(x, lower_bound)
    _check(y, s, y_ref, s_ref, F32, f"seed {seed}")


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_each_body_at_other_lengths(path):
    """Decode body over several tokens and prefill body at T = 1 and T = 6, integer mask."""
    seed = fresh_seed()
    for T in (1, 6):
        x = _inputs(2, T, 1, 2, 64, 48, F32, seed + T, mask=True, int_mask=True)
        p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
        with simulated_metal():
            y, s = metal.run_recurrent(p, x.q, x.k, x.v, x.state, x.mask, g=x.g, beta=x.beta, path=path)
            mx.eval(y, s)
        y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
        _check(y, s, y_ref, s_ref, F32, f"seed {seed + T}, path {path}, T {T}")


@pytest.mark.parametrize("L", [1, 2, 4, 8, 16, 32])
def test_every_lanes_per_row(L, monkeypatch, no_ops):
    """Both bodies with each lanes-per-row layout (1..32 lanes share a value row)."""
    monkeypatch.setattr(launch, "lanes_per_row", lambda Dk, per_lane: L)
    seed = fresh_seed()
    for T, gate in ((2, "key"), (7, "scalar")):
        x = _inputs(1, T, 1, 2, 64, 40, F32, seed + T, gate=gate, mask=True)
        y, s = run_rule(x)
        y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
        _check(y, s, y_ref, s_ref, F32, f"seed {seed + T}, L {L}, T {T}")


@pytest.mark.parametrize("L", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_decode_columns_in_fours(L, gate, monkeypatch, no_ops):
    """The decode body with GDN_VEC4 (CUDA's layout: each lane keeps groups of four adjacent state
    columns) at each lanes-per-row width that leaves a lane a multiple of four columns. Here the
    columns are moved one element at a time (the 16-byte moves are CUDA's); what is checked is
    that every column is read, updated and written exactly once, through every input's strides."""
    monkeypatch.setattr(metal, "DECODE_VEC4", True)
    monkeypatch.setattr(launch, "lanes_per_row", lambda Dk, per_lane: L)
    seed = fresh_seed()
    # fused gates are scalar: the fused step runs once, with the scalar-gate parameter
    for T, fused in ((1, True), (3, False)) if gate == "scalar" else ((3, False),):
        x = _inputs(2, T, 1, 2, 64, 40, F32, seed + T, gate=gate, mask=True)
        p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
        assert launch.recurrent_spec(p, path="decode", vec4=True).name.endswith("_v4")
        if fused:
            y, s = run_update(x, -1.0, True)
            y_ref, s_ref = ref_update(x, -1.0, True)
        else:
            y, s = run_rule(x)
            y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
        _check(y, s, y_ref, s_ref, F32, f"seed {seed + T}, L {L}, T {T}, gate {gate}")


@pytest.mark.parametrize("fused", [False, True])
def test_decode_after_prefill_equals_one_call(fused, no_ops):
    """State carried across calls (prefill 9 tokens, then 2 single-token steps) equals one call."""
    seed = fresh_seed()
    T, cut = 11, 9
    x = _inputs(1, T, 1, 2, 64, 64, F32, seed, mask=True)

    def part(lo, hi, state):
        y_ = dataclasses.replace(
            x, q=x.q[:, lo:hi], k=x.k[:, lo:hi], v=x.v[:, lo:hi], g=x.g[:, lo:hi], beta=x.beta[:, lo:hi],
            a=x.a[:, lo:hi], b=x.b[:, lo:hi], mask=x.mask[:, lo:hi], state=state,
        )
        return run_update(y_) if fused else run_rule(y_)

    y_all, s_all = run_update(x) if fused else run_rule(x)
    ys, s = [], x.state
    for lo, hi in ((0, cut), (cut, cut + 1), (cut + 1, T)):
        y, s = part(lo, hi, s)
        ys.append(y)
    y_steps = mx.concatenate(ys, axis=1)
    y_ref, s_ref = ref_update(x) if fused else reference.delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    _check(y_steps, s, y_ref, s_ref, F32, f"seed {seed}, split")
    _check(y_all, s_all, y_ref, s_ref, F32, f"seed {seed}, one call")
    assert reference.rel_error(y_steps, y_all) < 1e-5 and reference.rel_error(s, s_all) < 1e-5, f"seed {seed}"


def _view(x: mx.array, how: str) -> mx.array:
    """A non-contiguous view holding x's values: transposed storage, a slice, or a broadcast."""
    if how == "transposed":  # stored with the first two axes swapped
        return mx.swapaxes(mx.contiguous(mx.swapaxes(x, 0, 1)), 0, 1)
    if how == "last-transposed":  # last two axes swapped in storage (last-axis stride != 1)
        return mx.swapaxes(mx.contiguous(mx.swapaxes(x, -1, -2)), -1, -2)
    if how == "slice":  # every other element of a doubled last axis
        wide = mx.stack([x, mx.zeros_like(x)], axis=-1).reshape(*x.shape[:-1], 2 * x.shape[-1])
        return wide[..., ::2]
    raise ValueError(how)


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("fused", [False, True])
def test_strided_views(T, fused, no_ops):
    """Slices, transposes and broadcasts of every input give the same answer as contiguous ones.

    (The simulator hands kernels row-contiguous copies, so this checks the launch path;
    test_bodies_follow_strides checks the bodies' stride arithmetic.)"""
    seed = fresh_seed()
    gate = "scalar" if fused else "key"
    x = _inputs(2, T, 1, 2, 64, 32, F32, seed, gate=gate, mask=True)
    x.beta = mx.broadcast_to(x.beta[:, :1], x.beta.shape)  # stride 0 along T
    x.A_log, x.dt_bias = _view(x.A_log, "slice"), _view(x.dt_bias, "slice")
    views = dict(
        q=_view(x.q, "transposed"), k=_view(x.k, "slice"), v=_view(x.v, "last-transposed"),
        g=_view(x.g, "last-transposed" if gate == "key" else "transposed"),
        a=_view(x.a, "slice"), b=_view(x.b, "transposed"),
        state=_view(x.state, "last-transposed"), mask=_view(x.mask, "transposed"),
    )
    xv = dataclasses.replace(x, **views)
    y, s = run_update(xv, -1.5, True) if fused else run_rule(xv)
    if fused:
        y_ref, s_ref = ref_update(x, -1.5, True)
    else:
        y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    _check(y, s, y_ref, s_ref, F32, f"seed {seed}, T {T}, fused {fused}")


def _interleaved(x: mx.array, junk) -> mx.array:
    """x with a trailing axis of 2 holding junk: read as x, every stride is doubled."""
    other = mx.full(x.shape, junk, dtype=x.dtype) if not isinstance(junk, mx.array) else junk
    return mx.stack([x, other], axis=-1)


@pytest.mark.parametrize("path", ["decode", "prefill", "decode-vec4"])
@pytest.mark.parametrize("fused", [False, True])
def test_bodies_follow_strides(path, fused):
    """The bodies index every input through its *_strides.

    The simulator hands kernels row-contiguous buffers, so real views cannot reach it; instead
    each input gets a trailing axis of 2 whose second slot is junk (NaN, or the inverted mask):
    the body, reading axes 0..n-1 of it, sees every stride doubled, as for a strided view."""
    seed = fresh_seed()
    path, vec4 = path.split("-")[0], path.endswith("vec4")
    T = 3 if path == "decode" else 9
    gate = "scalar" if fused else "key"
    x = _inputs(2, T, 2, 4, 64, 40, F32, seed, gate=gate, mask=True)
    nan = float("nan")
    arrays = dict(q=_interleaved(x.q, nan), k=_interleaved(x.k, nan), v=_interleaved(x.v, nan),
                  state_in=_interleaved(x.state, nan), mask=_interleaved(x.mask, mx.logical_not(x.mask)))
    if fused:
        p = check_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask, -2.0, True)
        arrays.update(a=_interleaved(x.a, nan), b=_interleaved(x.b, nan), A_log=_interleaved(x.A_log, nan),
                      dt_bias=_interleaved(x.dt_bias, nan), lower_bound=launch.lower_bound_array(-2.0))
    else:
        p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
        arrays.update(g=_interleaved(x.g, nan), beta=_interleaved(x.beta, nan))
    spec = launch.recurrent_spec(p, lower=fused, neg=fused, path=path, vec4=vec4)
    assert spec.name.endswith("_v4") == vec4
    with simulated_metal():
        y, s = metal_kernel.kernel(spec)(inputs=spec.inputs(arrays), **spec.call_kwargs())
        mx.eval(y, s)
    y_ref, s_ref = ref_update(x, -2.0, True) if fused else reference.delta_rule(
        x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    _check(y, s, y_ref, s_ref, F32, f"seed {seed}, path {path}, fused {fused}")


def test_unsupported_shape_goes_to_ops(monkeypatch):
    """Dk = 16 is not a kernel shape: backend="metal" still answers, through the ops path."""
    seed = fresh_seed()
    x = _inputs(1, 5, 1, 2, 16, 32, F32, seed)
    p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    assert not metal.supports(p, "recurrent")
    calls = []
    real = ops_backend.run

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops_backend, "run", spy)
    y, s = run_rule(x)
    assert calls, "the ops backend did not run"
    y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    _check(y, s, y_ref, s_ref, F32, f"seed {seed}")


def test_auto_picks_metal_inside_simulator(monkeypatch):
    """backend="auto" runs the Metal kernels under the simulator, even on a CPU default device."""
    calls = []
    real = metal.run_recurrent

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(metal, "run_recurrent", spy)
    seed = fresh_seed()
    x = _inputs(1, 3, 1, 2, 32, 32, F32, seed)
    with simulated_metal():
        y, s = mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state)
        mx.eval(y, s)
    assert calls == [1, 1]  # the kernel's one trial on small inputs (mlx_gdn.fallback), then the call
    y_ref, s_ref = ref_update(x)
    _check(y, s, y_ref, s_ref, F32, f"seed {seed}")


def test_supports_and_specs():
    """Shapes the bodies take; every spec's grid is a whole number of threadgroups."""
    def prob(Dk, Dv=64, T=1, gate="scalar", fused=False, masked=False, dtype=F32, B=1, Hk=1, Hv=2):
        return Problem(B, T, Hk, Hv, Dk, Dv, dtype, gate, masked, fused)

    for Dk in (32, 64, 96, 128, 192, 256, 512):
        assert metal.supports(prob(Dk), "recurrent")
    for Dk in (16, 48, 100, 544):
        assert not metal.supports(prob(Dk), "recurrent")
    assert not metal.supports(prob(128, B=70000, Hv=1, Hk=1), "recurrent")
    for Dk, Dv, T, gate in ((32, 1, 1, "scalar"), (128, 128, 1, "key"), (192, 200, 40, "scalar"), (512, 64, 9, "key")):
        for fused in (False, True):
            spec = launch.recurrent_spec(prob(Dk, Dv, T, gate, fused, True, BF16), lower=fused, neg=fused)
            assert all(g % t == 0 for g, t in zip(spec.grid, spec.threadgroup)), spec
            tmpl = dict(spec.template)
            assert tmpl["R"] * tmpl["L"] == spec.threadgroup[0] and spec.threadgroup[0] % 32 == 0
            assert tmpl["R"] * spec.grid[0] // spec.threadgroup[0] >= Dv and Dk % tmpl["L"] == 0
            assert spec.input_names[-1] == "mask" and len(spec.input_names) == (10 if fused else 7)
            assert ("TB" in tmpl) == (T > launch.DECODE_MAX_T)
            if "TB" in tmpl:  # staged floats per block within the budget
                per = 2 * Dk + (Dk if gate == "key" else 1) + tmpl["R"] + 2
                assert 4 * per * tmpl["TB"] <= launch.STAGE_BYTES or tmpl["TB"] == 1


def test_compile_error_carries_compiler_message(monkeypatch):
    seed = fresh_seed()
    x = _inputs(1, 1, 1, 1, 32, 32, F32, seed)
    monkeypatch.setattr(launch.LaunchSpec, "source", lambda self: "this_is_not_declared = 1;\n")
    monkeypatch.setattr(metal_kernel, "_KERNELS", {})
    with pytest.raises(Exception, match="this_is_not_declared"):
        run_rule(x)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 12),
    Hk=st.integers(1, 2),
    ratio=st.integers(1, 4),
    Dk=st.sampled_from([32, 64]),
    Dv=st.sampled_from([8, 32, 33, 64]),
    dtype=st.sampled_from([F32, F16, BF16]),
    kind=st.sampled_from(["scalar", "key", "fused", "fused-lb", "fused-key", "fused-key-lb"]),
    masked=st.booleans(),
    neg=st.booleans(),
)
def test_property_small_shapes(B, T, Hk, ratio, Dk, Dv, dtype, kind, masked, neg):
    if B * Hk * ratio > 4:  # keep the simulated grid small
        Hk = 1
    seed = fresh_seed()
    Hv = Hk * ratio
    gate = "key" if kind == "key" else "scalar"
    x = _inputs(B, T, Hk, Hv, Dk, Dv, dtype, seed, gate=gate, mask=masked, fused_gate="key" if "key" in kind else "scalar")
    if kind.startswith("fused"):
        lb = -4.0 if kind.endswith("-lb") else None
        y, s = run_update(x, lb, neg)
        y_ref, s_ref = ref_update(x, lb, neg)
    else:
        y, s = run_rule(x)
        y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    _check(y, s, y_ref, s_ref, dtype, f"seed {seed}, B{B} T{T} Hk{Hk} Hv{Hv} Dk{Dk} Dv{Dv} {dtype} {kind} mask={masked}")


def test_poisoned_outputs_reach_the_kernel_call(monkeypatch):
    """With launch.POISON_OUTPUTS (set by the GPU tests) every launch asks for NaN-filled outputs."""
    seen = []

    def kern(**kw):
        seen.append(kw.get("init_value"))
        return [mx.zeros(s, d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])]

    seed = fresh_seed()
    x = _inputs(1, 3, 1, 2, 32, 8, mx.float32, seed)
    p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, None)
    spec = launch.recurrent_spec(p)
    arrays = dict(zip(spec.input_names, launch.recurrent_inputs(x.q, x.k, x.v, x.state, None, g=x.g, beta=x.beta)))
    spec.launch(kern, arrays)
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    spec.launch(kern, arrays)
    assert seen[0] is None and np.isnan(seen[1])
    # The real launch path accepts it (the simulator honours init_value like MLX).
    y, s = run_rule(x)
    _check(y, s, *reference.delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state), mx.float32, f"seed {seed}")


# Fused per-key gates (Kimi Linear, Kimi K3, Bailing MoE V3): a [B, T, Hv, Dk], A_log [Hv] or
# [Hv, 1], dt_bias [Hv, Dk] (GDN_DT_KEY) or per head.
# (B, T, Hk, Hv, Dk, Dv, dtype, masked, lower_bound, allow_neg_eigval, form)
PER_KEY_CASES = [
    (1, 1, 1, 2, 32, 32, F32, False, None, False, "A[Hv,1]-dt[Hv,Dk]"),
    (2, 3, 1, 2, 64, 24, BF16, True, -5.0, False, "A[Hv,1]-dt[Hv,Dk]"),
    (1, 4, 2, 4, 128, 32, F32, True, None, True, "A[Hv]-dt[Hv]"),
    (2, 2, 2, 2, 32, 40, BF16, False, -5.0, True, "A[Hv,1]-dt[Hv,1]"),
    (1, 9, 1, 2, 32, 16, F32, True, -5.0, True, "A[Hv]-dt[Hv,Dk]"),
    (2, 21, 1, 2, 64, 32, BF16, True, None, False, "A[Hv,1]-dt[Hv,Dk]"),
    (1, 13, 2, 4, 128, 16, F32, False, -0.5, False, "A[Hv]-dt[Hv]"),
    (1, 6, 1, 1, 64, 64, F16, True, None, True, "A[Hv,1]-dt[Hv,Dk]"),
]


def _per_key_form(x, form):
    """x with A_log and dt_bias in one of the accepted per-key forms (same values per head)."""
    Hv = x.A_log.shape[0]
    A_log = x.A_log.reshape(Hv, 1) if form.startswith("A[Hv,1]") else x.A_log
    per_head = x.dt_bias[:, 0]
    dt = {"dt[Hv,Dk]": x.dt_bias, "dt[Hv]": per_head, "dt[Hv,1]": per_head.reshape(Hv, 1)}[form.split("-")[1]]
    return dataclasses.replace(x, A_log=A_log, dt_bias=dt)


@pytest.mark.parametrize("case", PER_KEY_CASES, ids=lambda c: "B{}T{}Hk{}Hv{}Dk{}Dv{}-{}{}-lb{}-neg{}-{}".format(
    *c[:6], str(c[6]).split(".")[-1], "-mask" if c[7] else "", c[8], int(c[9]), c[10]))
def test_per_key_update_matches_reference(case, no_ops):
    B, T, Hk, Hv, Dk, Dv, dtype, masked, lower_bound, neg, form = case
    seed = fresh_seed()
    x = _per_key_form(_inputs(B, T, Hk, Hv, Dk, Dv, dtype, seed, mask=masked, fused_gate="key"), form)
    p = check_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask, lower_bound, neg)
    assert p.gate == "key" and metal.supports(p, "recurrent")
    y, s = run_update(x, lower_bound, neg)
    y_ref, s_ref = ref_update(x, lower_bound, neg)
    _check(y, s, y_ref, s_ref, dtype, f"seed {seed}, case {case}")


@pytest.mark.parametrize("T", [3, 7])
@pytest.mark.parametrize("lower_bound", [None, -3.0])
def test_per_key_fused_gates_at_extremes(T, lower_bound, no_ops):
    """Per-key a far out on both sides, |b| large, and a head whose exp(A_log) overflows float32
    (the kernel forms its products in log space, as the ops path does)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    x = _inputs(1, T, 1, 2, 32, 32, F32, seed, decay="one", fused_gate="key")
    a = rng.choice([-60.0, -20.0, -1e-3, 0.0, 15.0, 40.0], size=(1, T, 2, 32))
    b = rng.choice([-30.0, -3.0, 0.0, 4.0, 30.0], size=(1, T, 2))
    x.a, x.b = mx.array(a.astype(np.float32)), mx.array(b.astype(np.float32))
    x.A_log = mx.array([1.0, 95.0])
    y, s = run_update(x, lower_bound)
    y_ref, s_ref = ref_update(x, lower_bound)
    _check(y, s, y_ref, s_ref, F32, f"seed {seed}")


@pytest.mark.parametrize("L", [1, 4, 16])
def test_per_key_fused_decode_columns_in_fours(L, monkeypatch, no_ops):
    """Per-key fused gates in the decode body with GDN_VEC4: each lane's a and dt_bias columns are
    the same grouped columns as its state's."""
    monkeypatch.setattr(metal, "DECODE_VEC4", True)
    monkeypatch.setattr(launch, "lanes_per_row", lambda Dk, per_lane: L)
    seed = fresh_seed()
    x = _inputs(2, 2, 1, 2, 64, 40, F32, seed, mask=True, fused_gate="key")
    y, s = run_update(x, -2.0, True)
    y_ref, s_ref = ref_update(x, -2.0, True)
    _check(y, s, y_ref, s_ref, F32, f"seed {seed}, L {L}")


@pytest.mark.parametrize("path", ["decode", "prefill", "decode-vec4"])
@pytest.mark.parametrize("dt_key", [False, True])
def test_per_key_bodies_follow_strides(path, dt_key):
    """As test_bodies_follow_strides, for the fused per-key inputs (a, A_log, dt_bias per key)."""
    seed = fresh_seed()
    path, vec4 = path.split("-")[0], path.endswith("vec4")
    T = 3 if path == "decode" else 9
    x = _inputs(2, T, 2, 4, 64, 40, F32, seed, mask=True, fused_gate="key")
    if not dt_key:
        x.dt_bias = x.dt_bias[:, 0]
    nan = float("nan")
    p = check_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask, -2.0, True)
    arrays = dict(q=_interleaved(x.q, nan), k=_interleaved(x.k, nan), v=_interleaved(x.v, nan),
                  state_in=_interleaved(x.state, nan), mask=_interleaved(x.mask, mx.logical_not(x.mask)),
                  a=_interleaved(x.a, nan), b=_interleaved(x.b, nan), A_log=_interleaved(x.A_log, nan),
                  dt_bias=_interleaved(x.dt_bias, nan), lower_bound=launch.lower_bound_array(-2.0))
    spec = launch.recurrent_spec(p, lower=True, neg=True, path=path, vec4=vec4, dt_key=dt_key)
    assert spec.name.endswith("_dtkey") == dt_key and ("_v4" in spec.name) == vec4
    assert dict(spec.template)["KEYGATE"] and dict(spec.defines)["GDN_DT_KEY"] == int(dt_key)
    with simulated_metal():
        y, s = metal_kernel.kernel(spec)(inputs=spec.inputs(arrays), **spec.call_kwargs())
        mx.eval(y, s)
    y_ref, s_ref = ref_update(x, -2.0, True)
    _check(y, s, y_ref, s_ref, F32, f"seed {seed}, path {path}, dt_key {dt_key}")


def test_per_key_decode_after_prefill_equals_one_call(no_ops):
    """Kimi's serving pattern: prefill, then single-token steps carrying the state, per-key gates."""
    seed = fresh_seed()
    T, cut = 11, 8
    x = _per_key_form(_inputs(1, T, 1, 2, 64, 32, BF16, seed, mask=True, fused_gate="key"), "A[Hv,1]-dt[Hv,Dk]")
    ys, s = [], x.state
    for lo, hi in ((0, cut), (cut, cut + 1), (cut + 1, T)):
        part = dataclasses.replace(x, q=x.q[:, lo:hi], k=x.k[:, lo:hi], v=x.v[:, lo:hi], a=x.a[:, lo:hi],
                                   b=x.b[:, lo:hi], mask=x.mask[:, lo:hi], state=s)
        y, s = run_update(part, -5.0)
        ys.append(y)
    y_ref, s_ref = ref_update(x, -5.0)
    _check(mx.concatenate(ys, axis=1), s, y_ref, s_ref, BF16, f"seed {seed}")


def test_per_key_fused_gates_chunked_only_when_asked():
    """The chunked kernels take per-key fused gates when "chunked" is asked for (tests/
    test_metal_chunked.py, cuda_cases.py check their output); "auto" keeps the recurrent kernel, as
    no per-key chunked kernel is measured faster than it yet."""
    from mlx_gdn import backends
    from mlx_gdn.cuda import backend as cuda_backend

    x = _inputs(1, 40, 1, 2, 64, 64, F32, 0, fused_gate="key")
    p = check_update(x.q, x.k, x.v, x.a, x.b, x.A_log.reshape(2, 1), x.dt_bias, None, None, None, False)
    assert p.gate == "key" and p.fused
    assert metal.supports(p, "chunked") and cuda_backend.supports(p, "chunked")
    with simulated_metal():
        mod, algo = backends.resolve("metal", "chunked", p)
        assert (mod.name, algo) == ("metal", "chunked")
        mod, algo = backends.resolve("metal", "auto", p)
        assert (mod.name, algo) == ("metal", "recurrent")
