"""Every bad input raises a clear error naming the argument, before anything runs."""

import mlx.core as mx
import pytest

import mlx_gdn
from mlx_gdn.testing import random_inputs

B, T, HK, HV, DK, DV = 2, 3, 2, 4, 32, 16


@pytest.fixture
def x():
    return random_inputs(B, T, HK, HV, DK, DV, seed=1, mask=True)


def rule(x, **kw):
    args = dict(q=x.q, k=x.k, v=x.v, g=x.g, beta=x.beta, state=x.state, mask=x.mask)
    opts = {key: kw.pop(key) for key in ("backend", "algorithm", "use_kernel") if key in kw}
    args.update(kw)
    return mlx_gdn.gated_delta_rule(**args, **opts)


def update(x, **kw):
    args = dict(q=x.q, k=x.k, v=x.v, a=x.a, b=x.b, A_log=x.A_log, dt_bias=x.dt_bias, state=x.state, mask=x.mask)
    opts = {key: kw.pop(key) for key in ("backend", "algorithm", "lower_bound", "allow_neg_eigval", "use_kernel")
            if key in kw}
    args.update(kw)
    return mlx_gdn.gated_delta_update(**args, **opts)


BAD_SHAPES = [
    ("q", lambda x: x.q[0], ValueError, r"q must have rank 4"),
    ("k", lambda x: x.k[:, :, :1], ValueError, r"k must have shape"),
    ("v", lambda x: x.v[:1], ValueError, r"v must have shape \[B, T, Hv, Dv\]"),
    ("v", lambda x: x.v[:, :, :3], ValueError, r"Hv=3 must be a multiple of .*Hk=2"),
    ("state", lambda x: x.state[:, :, :, :8], ValueError, r"state must have shape \[B, Hv, Dv, Dk\] = \(2, 4, 16, 32\), got \(2, 4, 16, 8\)"),
    ("mask", lambda x: x.mask[:, :2], ValueError, r"mask must have shape \[B, T\]"),
]


@pytest.mark.parametrize("name,make,exc,msg", BAD_SHAPES)
@pytest.mark.parametrize("fn", [rule, update])
def test_bad_shapes(x, fn, name, make, exc, msg):
    with pytest.raises(exc, match=msg):
        fn(x, **{name: make(x)})


@pytest.mark.parametrize(
    "name,make,msg",
    [
        ("g", lambda x: x.g[..., None], r"g must have shape \[B, T, Hv\].*or \[B, T, Hv, Dk\]"),
        ("beta", lambda x: x.beta[:, :, :1], r"beta must have shape \[B, T, Hv\]"),
    ],
)
def test_bad_gate_shapes(x, name, make, msg):
    with pytest.raises(ValueError, match=msg):
        rule(x, **{name: make(x)})


@pytest.mark.parametrize(
    "name,make,msg",
    [
        ("a", lambda x: x.a[:, :1], r"a must have shape \[B, T, Hv\]"),
        ("a", lambda x: mx.repeat(x.a[..., None], 8, -1), r"a must have shape \[B, T, Hv\] = \(2, 3, 4\) \(one gate per head\) or \[B, T, Hv, Dk\] = \(2, 3, 4, 32\).*got \(2, 3, 4, 8\)"),
        ("a", lambda x: x.a[..., None, None], r"a must have shape \[B, T, Hv\]"),
        ("b", lambda x: x.b[..., None], r"b must have shape \[B, T, Hv\]"),
        ("A_log", lambda x: x.A_log[:2], r"A_log must have shape \[Hv\] = \(4,\) or \[Hv, 1\] = \(4, 1\), got \(2,\)"),
        ("A_log", lambda x: mx.zeros((4, 32)), r"A_log must have shape \[Hv\] = \(4,\) or \[Hv, 1\] = \(4, 1\), got \(4, 32\)"),
        ("dt_bias", lambda x: x.dt_bias[None], r"dt_bias must have shape \[Hv\] = \(4,\) or \[Hv, 1\] = \(4, 1\) \(\[Hv, Dk\] only with a per-key a"),
        ("dt_bias", lambda x: mx.zeros((4, 32)), r"dt_bias must have shape \[Hv\].*\[Hv, Dk\] only with a per-key a.*got \(4, 32\)"),
    ],
)
def test_bad_fused_gate_shapes(x, name, make, msg):
    with pytest.raises(ValueError, match=msg):
        update(x, **{name: make(x)})


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_integer_inputs_rejected(x, name):
    arr = getattr(x, name)
    with pytest.raises(TypeError, match=rf"{name} must have a floating dtype.*got int32"):
        rule(x, **{name: arr.astype(mx.int32)})


def test_mixed_qkv_dtypes_rejected(x):
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        rule(x, v=x.v.astype(mx.bfloat16))


@pytest.mark.parametrize("fn,name", [(rule, "g"), (rule, "beta"), (update, "a"), (update, "b"), (update, "A_log"), (update, "dt_bias")])
def test_integer_gates_rejected(x, fn, name):
    with pytest.raises(TypeError, match=rf"{name} must have a floating dtype"):
        fn(x, **{name: getattr(x, name).astype(mx.int32)})


@pytest.mark.parametrize("fn", [rule, update])
def test_state_must_be_float(x, fn):
    with pytest.raises(TypeError, match="state must have a floating dtype.*got int32"):
        fn(x, state=x.state.astype(mx.int32))


@pytest.fixture
def xk():
    """Per-key fused gates (Kimi's shapes): a [B, T, Hv, Dk], dt_bias [Hv, Dk]."""
    return random_inputs(B, T, HK, HV, DK, DV, seed=3, mask=True, fused_gate="key")


@pytest.mark.parametrize(
    "name,make,msg",
    [
        ("a", lambda x: x.a[..., :16], r"a must have shape .*\[B, T, Hv, Dk\] = \(2, 3, 4, 32\).*got \(2, 3, 4, 16\)"),
        ("b", lambda x: x.a, r"b must have shape \[B, T, Hv\] = \(2, 3, 4\), got \(2, 3, 4, 32\)"),
        ("A_log", lambda x: x.A_log.reshape(1, 4), r"A_log must have shape \[Hv\] = \(4,\) or \[Hv, 1\] = \(4, 1\), got \(1, 4\)"),
        ("A_log", lambda x: mx.zeros((4, 32)), r"A_log must have shape .*got \(4, 32\)"),
        ("dt_bias", lambda x: x.dt_bias[:, :16], r"dt_bias must have shape \[Hv\] = \(4,\) or \[Hv, 1\] = \(4, 1\) or \[Hv, Dk\] = \(4, 32\), got \(4, 16\)"),
        ("dt_bias", lambda x: x.dt_bias.T, r"dt_bias must have shape .*got \(32, 4\)"),
        ("dt_bias", lambda x: x.dt_bias.reshape(-1), r"dt_bias must have shape .*got \(128,\)"),
    ],
)
def test_bad_per_key_gate_shapes(xk, name, make, msg):
    with pytest.raises(ValueError, match=msg):
        update(xk, **{name: make(xk)})


@pytest.mark.parametrize("name", ["a", "A_log", "dt_bias"])
def test_integer_per_key_gates_rejected(xk, name):
    with pytest.raises(TypeError, match=rf"{name} must have a floating dtype.*got int32"):
        update(xk, **{name: getattr(xk, name).astype(mx.int32)})


@pytest.mark.parametrize("fn", [rule, update])
@pytest.mark.parametrize("value", [1, 0, None, "yes", 1.0])
def test_bad_use_kernel(x, fn, value):
    with pytest.raises(TypeError, match=rf"use_kernel must be a bool, got {type(value).__name__}"):
        fn(x, use_kernel=value)


@pytest.mark.parametrize("fn", [rule, update])
@pytest.mark.parametrize("backend", ["metal", "cuda"])
def test_use_kernel_false_with_a_kernel_backend(x, fn, backend):
    with pytest.raises(ValueError, match=rf"use_kernel=False .* backend='{backend}'"):
        fn(x, use_kernel=False, backend=backend)


@pytest.mark.parametrize("fn", [rule, update])
def test_use_kernel_false_with_unknown_backend(x, fn):
    with pytest.raises(ValueError, match="backend must be one of"):
        fn(x, use_kernel=False, backend="tpu")


@pytest.mark.parametrize("value,exc", [(0.0, ValueError), (-0.1, ValueError), (float("inf"), ValueError),
                                       (float("nan"), ValueError), ("0.1", TypeError), (True, TypeError)])
def test_bad_inv_scale(x, value, exc):
    with pytest.raises(exc, match="inv_scale"):
        mlx_gdn.normalize_qk(x.q, x.k, inv_scale=value)


def test_float_mask_rejected(x):
    with pytest.raises(TypeError, match="mask must be bool"):
        rule(x, mask=x.mask.astype(mx.float32))


def test_numpy_input_rejected(x):
    import numpy as np

    with pytest.raises(TypeError, match="q must be an mlx.core.array, got ndarray"):
        rule(x, q=np.array(x.q))


@pytest.mark.parametrize("kw,msg", [({"backend": "tpu"}, "backend must be one of"), ({"algorithm": "fast"}, "algorithm must be one of")])
@pytest.mark.parametrize("fn", [rule, update])
def test_unknown_backend_or_algorithm(x, fn, kw, msg):
    with pytest.raises(ValueError, match=msg):
        fn(x, **kw)


def test_unavailable_backend_is_clear(x):
    from mlx_gdn.backends import is_available

    for name in ("metal", "cuda"):
        if not is_available(name):
            with pytest.raises(ValueError, match=rf"backend '{name}' is not available on this machine"):
                rule(x, backend=name)


@pytest.mark.parametrize("lb,exc", [(0.5, ValueError), (float("nan"), ValueError), (float("-inf"), ValueError), ("x", TypeError), (True, TypeError)])
def test_bad_lower_bound(x, lb, exc):
    with pytest.raises(exc, match="lower_bound"):
        update(x, lower_bound=lb)


def test_bad_allow_neg_eigval(x):
    with pytest.raises(TypeError, match="allow_neg_eigval must be a bool"):
        update(x, allow_neg_eigval=1)


def test_errors_come_before_any_work(x, monkeypatch):
    """Validation fails before the backend is asked to run anything."""
    from mlx_gdn.ops import backend as ops_backend

    def boom(*a, **k):
        raise AssertionError("backend ran on invalid input")

    monkeypatch.setattr(ops_backend, "run", boom)
    with pytest.raises(ValueError):
        rule(x, beta=x.beta[:, :1], backend="ops")
    with pytest.raises(ValueError):
        update(x, A_log=x.A_log[:1], backend="ops")


def test_empty_time_axis_returns_state_unchanged():
    x = random_inputs(B, 0, HK, HV, DK, DV, seed=2)
    y, s = rule(x)
    assert y.shape == (B, 0, HV, DV) and y.dtype == x.q.dtype
    assert mx.array_equal(s, x.state)


def test_numpy_scalar_lower_bound_accepted(x):
    import numpy as np

    y1, s1 = update(x, lower_bound=np.float32(-2.0), backend="ops")
    y2, s2 = update(x, lower_bound=-2.0, backend="ops")
    assert mx.array_equal(y1, y2) and mx.array_equal(s1, s2)
    with pytest.raises(TypeError, match="lower_bound"):
        update(x, lower_bound=np.bool_(True))


def test_fused_gate_shapes_accepted_exactly():
    """Every (a, A_log, dt_bias) shape combination: accepted iff listed, and the accepted ones run.
    Hv = 4 and Dk = 32 differ from every other axis here, so no wrong shape passes by coincidence."""
    import itertools

    from mlx_gdn.validate import check_update

    x = random_inputs(B, T, HK, HV, DK, DV, seed=4, mask=True)
    a_shapes = {"scalar": (B, T, HV), "key": (B, T, HV, DK)}
    A_shapes = [(HV,), (HV, 1), (1, HV), (HV, DK), (1,), (HV, 1, 1)]
    dt_shapes = [(HV,), (HV, 1), (HV, DK), (1, HV), (DK,), (DK, HV), (HV, DK, 1), (HV * DK,)]
    for (gate, a_shape), A_shape, dt_shape in itertools.product(a_shapes.items(), A_shapes, dt_shapes):
        ok = A_shape in ((HV,), (HV, 1)) and (dt_shape in ((HV,), (HV, 1)) or (gate == "key" and dt_shape == (HV, DK)))
        a, A_log, dt_bias = mx.zeros(a_shape), mx.zeros(A_shape), mx.zeros(dt_shape)
        what = f"a {a_shape}, A_log {A_shape}, dt_bias {dt_shape}"
        if ok:
            p = check_update(x.q, x.k, x.v, a, x.b, A_log, dt_bias, x.state, x.mask, None, False)
            assert p.gate == gate, what
        else:
            bad = "A_log" if A_shape not in ((HV,), (HV, 1)) else "dt_bias"
            with pytest.raises(ValueError, match=rf"{bad} must have shape"):
                check_update(x.q, x.k, x.v, a, x.b, A_log, dt_bias, x.state, x.mask, None, False)
