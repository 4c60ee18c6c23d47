"""mlx_gdn takes every call mlx-lm's models make into mlx_lm.models.gated_delta, unchanged, and
gives mlx-lm's answer (its ops path, use_kernel=False) and the float64 reference's."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_gdn
from mlx_gdn import reference
from mlx_gdn.reference import rel_error, to_numpy
from mlx_gdn.testing import TOLERANCE, fresh_seed, random_inputs

lm = pytest.importorskip("mlx_lm.models.gated_delta")

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
LOWER = -5.0  # Bailing MoE V3's kda_lower_bound default


def _model_inputs(model, B, T, Hk, Hv, D, dtype, seed, *, state=True, mask=False):
    """(args, kwargs) for `gated_delta_update` exactly as mlx-lm's `model` builds them."""
    x = random_inputs(B, T, Hk, Hv, D, D, dtype=dtype, seed=seed, mask=mask,
                      fused_gate="key" if model in ("kimi_linear", "kimi_k3", "bailing_moe_v3") else "scalar")
    qn, kn = (mx.random.normal(z.shape, key=mx.random.key(seed + i)).astype(dtype) for i, z in enumerate((x.q, x.k)))
    # Every model normalises with mlx-lm's keyword call; the inputs then are identical for both.
    q, k = lm.normalize_qk(qn, kn, inv_scale=D**-0.5, eps=1e-6)
    st = x.state if state else None
    if model in ("qwen3_5", "qwen3_next"):
        return (q, k, x.v, x.a, x.b, x.A_log, x.dt_bias, st, x.mask), dict(use_kernel=True), {}
    if model == "olmo_hybrid":
        return (q, k, x.v, x.a, x.b, x.A_log, x.dt_bias, st, x.mask), dict(use_kernel=True, allow_neg_eigval=True), {}
    # Per-key models keep A_log [H] and dt_bias [H * D] as parameters and reshape them per call.
    A_log, dt_bias = x.A_log, x.dt_bias.reshape(-1)
    args = (q, k, x.v, x.a, x.b, A_log.reshape(Hv, 1), dt_bias.reshape(Hv, D))
    kw = dict(state=st, mask=x.mask, use_kernel=True)
    if model == "kimi_k3":
        kw["lower_bound"] = LOWER
    if model == "bailing_moe_v3":
        args = args[:4] + (x.b.astype(F32),) + args[5:]  # b_proj(x).astype(mx.float32)
        kw["lower_bound"] = LOWER
    return args, kw, {}


MODELS = ["qwen3_5", "qwen3_next", "olmo_hybrid", "kimi_linear", "kimi_k3", "bailing_moe_v3"]
# Per-key models have Hk == Hv; the Qwen family groups two value heads per key head.
HEADS = {"kimi_linear": (2, 2), "kimi_k3": (2, 2), "bailing_moe_v3": (2, 2)}


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("model", MODELS)
def test_model_call_equals_mlx_lm_and_reference(model, mask, dtype):
    seed = fresh_seed()
    Hk, Hv = HEADS.get(model, (1, 2))
    args, kw, _ = _model_inputs(model, 2, 6, Hk, Hv, 32, dtype, seed, mask=mask)
    y, s = mlx_gdn.gated_delta_update(*args, **kw)
    y_lm, s_lm = lm.gated_delta_update(*args, **{**kw, "use_kernel": False})
    q, k, v, a, b, A_log, dt_bias = args[:7]
    st, m = (args[7], args[8]) if len(args) > 7 else (kw["state"], kw["mask"])
    g, beta = reference.gates(a, b, A_log, dt_bias, kw.get("lower_bound"), kw.get("allow_neg_eigval", False))
    y_ref, s_ref = reference.delta_rule(q, k, v, g, beta, st, m)
    what = f"seed {seed}, {model}, {dtype}, mask {mask}"
    assert y.dtype == y_lm.dtype == dtype and s.dtype == F32, what
    tol = TOLERANCE[dtype]
    if m is not None:
        # mlx-lm's ops path leaves y at a masked step as computed (its kernels write 0 there, as
        # this package does everywhere): compare y with it at the steps that ran.
        keep = m[:, :, None, None]
        y_lm = mx.where(keep, y_lm, 0.0).astype(dtype)
    for name, got, want in (("y vs mlx-lm", y, y_lm), ("state vs mlx-lm", s, s_lm), ("y vs float64", y, y_ref),
                            ("state vs float64", s, s_ref)):
        err = rel_error(got, want)
        assert err < tol, f"{what}: {name} relative error {err:.2e} (bound {tol:.0e})"


@pytest.mark.parametrize("model", MODELS)
def test_model_call_without_state_or_mask(model):
    """The first prompt of a generation: state and mask None, state comes back float32 zeros-started."""
    seed = fresh_seed()
    Hk, Hv = HEADS.get(model, (1, 2))
    args, kw, _ = _model_inputs(model, 1, 5, Hk, Hv, 64, F32, seed, state=False)
    y, s = mlx_gdn.gated_delta_update(*args, **kw)
    y_lm, s_lm = lm.gated_delta_update(*args, **{**kw, "use_kernel": False})
    assert s.dtype == F32
    assert rel_error(y, y_lm) < 1e-4 and rel_error(s, s_lm) < 1e-4, f"seed {seed}, {model}"


@pytest.mark.parametrize("model", ["qwen3_5", "kimi_k3"])
def test_use_kernel_false_runs_ops(model, monkeypatch):
    """use_kernel=False (a model in training) takes the ops path even where a kernel would run."""
    from mlx_gdn.metal import backend as metal
    from mlx_gdn.sim import simulated_metal

    def refuse(*a, **k):
        raise AssertionError("a kernel backend ran with use_kernel=False")

    monkeypatch.setattr(metal, "run", refuse)
    seed = fresh_seed()
    Hk, Hv = HEADS.get(model, (1, 2))
    args, kw, _ = _model_inputs(model, 1, 3, Hk, Hv, 32, F32, seed)
    with simulated_metal():
        y, s = mlx_gdn.gated_delta_update(*args, **{**kw, "use_kernel": False})
        with pytest.raises(AssertionError, match="use_kernel=False"):
            mlx_gdn.gated_delta_update(*args, **kw)
    y_lm, s_lm = lm.gated_delta_update(*args, **{**kw, "use_kernel": False})
    assert rel_error(y, y_lm) < 1e-4 and rel_error(s, s_lm) < 1e-4, f"seed {seed}"


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_normalize_qk_keyword_call_equals_mlx_lm(dtype):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    q, k = (mx.array(rng.standard_normal((2, 3, 2, 64)).astype(np.float32)).astype(dtype) for _ in range(2))
    for inv in (64**-0.5, 0.3):
        ours = mlx_gdn.normalize_qk(q, k, inv_scale=inv, eps=1e-6)
        theirs = lm.normalize_qk(q, k, inv_scale=inv, eps=1e-6)
        for o, t in zip(ours, theirs):
            assert o.dtype == t.dtype == dtype
            assert mx.array_equal(o, t), f"seed {seed}, inv_scale {inv}"
    # inv_scale None is Dk**-0.5; positional inv_scale works too.
    for o, t in zip(mlx_gdn.normalize_qk(q, k), lm.normalize_qk(q, k, inv_scale=64**-0.5, eps=1e-6)):
        assert mx.array_equal(o, t), f"seed {seed}"
    for o, t in zip(mlx_gdn.normalize_qk(q, k, 0.25), lm.normalize_qk(q, k, inv_scale=0.25, eps=1e-6)):
        assert mx.array_equal(o, t), f"seed {seed}"
    # against float64 at inv_scale = Dk**-0.5: q / sqrt(Dk) / sqrt(|q|^2 + eps), k / sqrt(|k|^2 + eps)
    for got, x, scale in zip(mlx_gdn.normalize_qk(q, k), (q, k), (64**-0.5, 1.0)):
        xn = to_numpy(x)
        want = scale * xn / np.sqrt((xn**2).sum(-1, keepdims=True) + 1e-6)
        assert rel_error(got, want) < TOLERANCE[dtype], f"seed {seed}"


# (A_log shape, a shape, dt_bias shape) as mlx-lm's models pass them to compute_g
G_SHAPES = [((4,), (2, 5, 4), (4,)), ((4, 1), (2, 5, 4, 32), (4, 32)), ((4, 1), (2, 5, 4, 32), (4, 1))]


@pytest.mark.parametrize("shapes", G_SHAPES)
@pytest.mark.parametrize("lower_bound", [None, LOWER])
def test_compute_g_in_mlx_lm_order_equals_mlx_lm(shapes, lower_bound):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    A_log = mx.array(np.log(rng.uniform(0.5, 16.0, shapes[0])).astype(np.float32))
    a = mx.array((rng.standard_normal(shapes[1]) * 3).astype(np.float32))
    dt_bias = mx.array(rng.standard_normal(shapes[2]).astype(np.float32))
    ours = mlx_gdn.compute_g(A_log, a, dt_bias, lower_bound)
    if lower_bound is None:
        theirs = lm.compute_g(A_log, a, dt_bias)
    else:
        theirs = lm.compute_lower_bound_g(A_log, a, dt_bias, lower_bound)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == F32
    err = np.abs(to_numpy(ours) - to_numpy(theirs)) / np.maximum(np.abs(to_numpy(theirs)), 1e-30)
    assert err.max() < 1e-5, f"seed {seed}: max relative difference {err.max():.2e}"
    # by keyword, too
    kw = mlx_gdn.compute_g(A_log=A_log, a=a, dt_bias=dt_bias, lower_bound=lower_bound)
    assert mx.array_equal(kw, ours)


@pytest.mark.parametrize("lower_bound", [None, LOWER])
def test_compute_g_finite_where_mlx_lm_is_nan(lower_bound):
    """exp(A_log) overflows float32: mlx-lm's product is inf * 0 = NaN, ours keeps the limit."""
    A_log = mx.array([[100.0], [1.0]])
    a = mx.array(np.array([[[[-200.0, -50.0, 0.0, 30.0], [-200.0, -50.0, 0.0, 30.0]]]], np.float32))
    dt_bias = mx.zeros((2, 4))
    ours = to_numpy(mlx_gdn.compute_g(A_log, a, dt_bias, lower_bound))
    g_ref, _ = reference.gates(a, mx.zeros((1, 1, 2)), A_log, dt_bias, lower_bound)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, g_ref, rtol=1e-5, atol=1e-30)
    theirs = lm.compute_g(A_log, a, dt_bias) if lower_bound is None else lm.compute_lower_bound_g(A_log, a, dt_bias, lower_bound)
    theirs = to_numpy(theirs)
    finite = np.isfinite(theirs)
    assert not finite.all(), "mlx-lm no longer gives NaN here: the test's premise changed"
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-5)


# Per-key fused gates in every accepted form: (A_log as [Hv] or [Hv, 1]) x (dt_bias per key or per head)
def _per_key_forms(x):
    Hv = x.A_log.shape[0]
    per_head = x.dt_bias[:, 0]
    return {
        "A[Hv]-dt[Hv,Dk]": (x.A_log, x.dt_bias),
        "A[Hv,1]-dt[Hv,Dk]": (x.A_log.reshape(Hv, 1), x.dt_bias),
        "A[Hv]-dt[Hv]": (x.A_log, per_head),
        "A[Hv,1]-dt[Hv,1]": (x.A_log.reshape(Hv, 1), per_head.reshape(Hv, 1)),
    }


@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("lower_bound,neg", [(None, False), (LOWER, True), (-0.5, False), (None, True)])
def test_per_key_fused_gates_on_ops(algorithm, dtype, lower_bound, neg):
    seed = fresh_seed()
    x = random_inputs(2, 11, 1, 2, 32, 16, dtype=dtype, seed=seed, mask=True, fused_gate="key")
    for form, (A_log, dt_bias) in _per_key_forms(x).items():
        y, s = mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, A_log, dt_bias, x.state, x.mask, lower_bound=lower_bound,
                                          allow_neg_eigval=neg, backend="ops", algorithm=algorithm)
        g, beta = reference.gates(x.a, x.b, A_log, dt_bias, lower_bound, neg)
        assert g.shape == x.a.shape
        y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)
        tol = TOLERANCE[dtype]
        ey, es = rel_error(y, y_ref), rel_error(s, s_ref)
        assert ey < tol and es < tol, f"seed {seed}, {form}: y {ey:.2e}, state {es:.2e}"


def test_reference_per_key_gates_from_first_principles():
    """The reference's per-key gate, element by element from the formula."""
    seed = fresh_seed()
    x = random_inputs(1, 2, 1, 3, 4, 4, seed=seed, fused_gate="key")
    g, _ = reference.gates(x.a, x.b, x.A_log.reshape(3, 1), x.dt_bias, LOWER)
    a, A_log, dt = to_numpy(x.a), to_numpy(x.A_log), to_numpy(x.dt_bias)
    for t in range(2):
        for h in range(3):
            for j in range(4):
                z = np.exp(A_log[h]) * (a[0, t, h, j] + dt[h, j])
                want = np.exp(LOWER / (1.0 + np.exp(-z)))
                assert abs(g[0, t, h, j] - want) <= 1e-12 * want, f"seed {seed}"


def test_compute_gates_per_key_reads_per_head():
    """compute_gates reads A_log and a [Hv] dt_bias per head whatever a's rank (compute_g broadcasts as given)."""
    seed = fresh_seed()
    x = random_inputs(1, 3, 1, 4, 32, 8, seed=seed, fused_gate="key")
    for form, (A_log, dt_bias) in _per_key_forms(x).items():
        g, beta = mlx_gdn.compute_gates(x.a, x.b, A_log, dt_bias, LOWER, True)
        g_ref, beta_ref = reference.gates(x.a, x.b, A_log, dt_bias, LOWER, True)
        assert g.shape == x.a.shape and beta.shape == x.b.shape
        assert rel_error(g, g_ref) < 1e-6 and rel_error(beta, beta_ref) < 1e-6, f"seed {seed}, {form}"


@pytest.mark.parametrize("state_dtype", [BF16, F16])
@pytest.mark.parametrize("fn", ["rule", "update"])
@pytest.mark.parametrize("algorithm", ["recurrent", "chunked", "metal-recurrent"])
def test_half_precision_state(state_dtype, fn, algorithm):
    """A bf16/f16 state is taken, the recurrence runs in float32, and the state returns in its dtype
    (ops paths, and the Metal kernel in the simulator)."""
    import contextlib

    from mlx_gdn.sim import simulated_metal

    seed = fresh_seed()
    x = random_inputs(2, 9, 1, 2, 32, 16, seed=seed, mask=True, fused_gate="key" if fn == "update" else "scalar")
    st = x.state.astype(state_dtype)
    metal = algorithm.startswith("metal")
    kw = dict(backend="metal" if metal else "ops", algorithm=algorithm.split("-")[-1])
    with simulated_metal() if metal else contextlib.nullcontext():
        if fn == "rule":
            y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, st, x.mask, **kw)
            g, beta = x.g, x.beta
        else:
            y, s = mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, st, x.mask, **kw)
            g, beta = reference.gates(x.a, x.b, x.A_log, x.dt_bias)
        mx.eval(y, s)
    assert s.dtype == state_dtype and y.dtype == F32
    y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, g, beta, st, x.mask)
    ey, es = rel_error(y, y_ref), rel_error(s, s_ref)
    # y comes from a float32 recurrence (the half state is exact in float32); the new state is
    # rounded once to its dtype.
    assert ey < 1e-4 and es < 2e-2, f"seed {seed}: y {ey:.2e}, state {es:.2e}"
    # an empty call hands the state back untouched
    y0, s0 = mlx_gdn.gated_delta_rule(x.q[:, :0], x.k[:, :0], x.v[:, :0], x.g[:, :0], x.beta[:, :0], st)
    assert s0.dtype == state_dtype and mx.array_equal(s0, st)


# mlx-lm's own linear-attention layers, their module's gated_delta_update and normalize_qk swapped
# for mlx_gdn's: the models' code runs unchanged (prefill, then decode steps through the cache).
def _mlx_lm_layer(model):
    import importlib

    mod = importlib.import_module(f"mlx_lm.models.{model}")
    H, D, hidden = 2, 32, 48
    if model == "kimi_linear":
        args = mod.ModelArgs.from_dict(dict(
            model_type=model, vocab_size=8, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=H,
            num_key_value_heads=H, intermediate_size=8, head_dim=D, rope_theta=1e4, rms_norm_eps=1e-5,
            linear_attn_config={"num_heads": H, "head_dim": D, "short_conv_kernel_size": 4}, model_max_length=64,
            num_experts=1, moe_intermediate_size=8, kv_lora_rank=8))
        layer, slots = mod.KimiDeltaAttention(args, 0), 4
    elif model == "kimi_k3":
        args = mod.TextArgs(hidden_size=hidden, linear_attn_config={
            "num_heads": H, "head_dim": D, "short_conv_kernel_size": 4, "gate_lower_bound": LOWER})
        layer, slots = mod.KimiK3DeltaAttention(args, 0), 2
    elif model == "bailing_moe_v3":
        args = mod.ModelArgs(hidden_size=hidden, num_attention_heads=H, head_dim=D)
        layer, slots = mod.BailingKDA(args), 4
    else:  # olmo_hybrid: grouped heads, allow_neg_eigval
        args = mod.ModelArgs.from_dict(dict(
            model_type=model, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=8, max_position_embeddings=64,
            linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=D, linear_value_head_dim=D,
            linear_conv_kernel_dim=4, linear_allow_neg_eigval=True, tie_word_embeddings=False, attention_bias=False))
        layer, slots = mod.GatedDeltaNet(args), 4
    return mod, layer, slots


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("model", ["kimi_linear", "kimi_k3", "bailing_moe_v3", "olmo_hybrid"])
def test_mlx_lm_layers_run_on_mlx_gdn(model, kernel, monkeypatch):
    """The layer's output through mlx_gdn (ops path, or the Metal kernel in the simulator) equals the
    layer's output through mlx-lm's own functions, for a prompt and two decode steps."""
    from mlx_lm.models.cache import ArraysCache

    from mlx_gdn.metal import backend as metal
    from mlx_gdn.sim import simulated_metal

    seed = fresh_seed()
    mx.random.seed(seed % (2**31))
    mod, layer, slots = _mlx_lm_layer(model)
    # Trained-looking gate parameters (the constructors leave dt_bias at zero).
    layer.A_log = mx.log(mx.random.uniform(0.5, 16.0, layer.A_log.shape))
    layer.dt_bias = mx.random.normal(layer.dt_bias.shape)
    layer.eval()
    x = mx.random.normal((2, 7, 48))
    steps = [x[:, :5], x[:, 5:6], x[:, 6:7]]

    def run():
        cache = ArraysCache(size=slots)
        return mx.concatenate([layer(s, cache=cache) for s in steps], axis=1)

    want = run()
    monkeypatch.setattr(mod, "gated_delta_update", mlx_gdn.gated_delta_update)
    monkeypatch.setattr(mod, "normalize_qk", mlx_gdn.normalize_qk)
    calls = []
    real = metal.run_recurrent
    monkeypatch.setattr(metal, "run_recurrent", lambda *a, **k: calls.append(1) or real(*a, **k))
    if kernel:
        with simulated_metal():
            got = run()
            mx.eval(got)
        assert len(calls) == len(steps), "the Metal kernel did not run every step"
    else:
        got = run()
    err = rel_error(got, want)
    assert err < 1e-4, f"seed {seed}, {model}, kernel {kernel}: relative error {err:.2e}"


def test_gated_delta_module_is_a_superset_of_mlx_lm():
    """Every public function of mlx_lm.models.gated_delta is in mlx_gdn.gated_delta and takes
    every parameter mlx-lm's takes, in the same positions and of the same kinds."""
    import inspect

    from mlx_gdn import gated_delta as ours

    names = [n for n, f in vars(lm).items() if not n.startswith("_") and inspect.isfunction(f)
             and f.__module__ == lm.__name__]
    names += ["compute_g", "compute_lower_bound_g"]  # compiled functions, not plain Python ones
    assert {"gated_delta_update", "gated_delta_ops", "gated_delta_kernel", "normalize_qk"} <= set(names)
    for name in names:
        assert hasattr(ours, name), name
        try:
            theirs_sig = inspect.signature(getattr(lm, name))
        except (TypeError, ValueError):
            continue
        mine = inspect.signature(getattr(ours, name)).parameters
        for i, (pname, par) in enumerate(theirs_sig.parameters.items()):
            assert pname in mine, f"{name}: no parameter {pname}"
            if par.kind in (par.POSITIONAL_ONLY, par.POSITIONAL_OR_KEYWORD):
                assert list(mine).index(pname) == i and mine[pname].kind == par.kind, f"{name}: {pname}"
            if par.default is par.empty and mine[pname].default is not par.empty:
                continue  # optional here where mlx-lm requires it: still a superset
            if par.default is not par.empty:
                assert mine[pname].default == par.default, f"{name}: default of {pname}"


@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_gated_delta_module_calls_equal_mlx_lm(gate):
    from mlx_gdn import gated_delta as ours
    from mlx_gdn.sim import simulated_metal

    seed = fresh_seed()
    x = random_inputs(2, 6, 1, 2, 32, 16, seed=seed, gate=gate)
    y_lm, s_lm = lm.gated_delta_ops(x.q, x.k, x.v, x.g, x.beta, x.state)
    y, s = ours.gated_delta_ops(x.q, x.k, x.v, x.g, x.beta, x.state)
    assert rel_error(y, y_lm) < 1e-4 and rel_error(s, s_lm) < 1e-4, f"seed {seed}"
    with pytest.raises(ValueError, match="gated_delta_kernel needs a GPU backend"):
        ours.gated_delta_kernel(x.q, x.k, x.v, x.g, x.beta, x.state)
    for kern in (ours.gated_delta_kernel, ours.gated_delta_kernel_unpacked, ours.gated_delta_kernel_xtree):
        with simulated_metal():
            y, s = kern(x.q, x.k, x.v, x.g, x.beta, x.state)
            mx.eval(y, s)
        assert rel_error(y, y_lm) < 1e-4 and rel_error(s, s_lm) < 1e-4, f"seed {seed}"
    A_log = mx.array(np.log(np.random.default_rng(seed).uniform(0.5, 16, (2, 1))).astype(np.float32))
    a = mx.random.normal((2, 6, 2, 32)) * 3
    ours_g = ours.compute_lower_bound_g(A_log, a, x.dt_bias[:, None], LOWER)
    theirs_g = lm.compute_lower_bound_g(A_log, a, x.dt_bias[:, None], LOWER)
    assert rel_error(ours_g, theirs_g) < 1e-6, f"seed {seed}"


@pytest.mark.parametrize("lower_bound", [None, LOWER])
def test_compute_g_bf16_inputs_in_float32(lower_bound):
    """bf16 a and dt_bias (a model loaded in bf16): the sum and softplus are formed in float32, so
    g is float32-accurate from the bf16 values given; mlx-lm's compute_g adds (and takes softplus)
    in bf16 and is off by bf16 rounding there."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    A_log = mx.array(np.log(rng.uniform(0.5, 16.0, (4, 1))).astype(np.float32))
    a = mx.array((rng.standard_normal((2, 5, 4, 32)) * 3).astype(np.float32)).astype(BF16)
    dt_bias = mx.array(rng.standard_normal((4, 32)).astype(np.float32)).astype(BF16)
    ours = mlx_gdn.compute_g(A_log, a, dt_bias, lower_bound)
    ref, _ = reference.gates(a, mx.zeros((2, 5, 4)), A_log, dt_bias, lower_bound)
    theirs = lm.compute_g(A_log, a, dt_bias) if lower_bound is None else lm.compute_lower_bound_g(A_log, a, dt_bias, lower_bound)
    e_ours, e_theirs = rel_error(ours, ref), rel_error(theirs, ref)
    assert ours.dtype == F32 and e_ours < 1e-5, f"seed {seed}: {e_ours:.2e}"
    assert e_ours <= e_theirs, f"seed {seed}: ours {e_ours:.2e}, mlx-lm {e_theirs:.2e}"
