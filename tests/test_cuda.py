"""The "cuda" backend on a real NVIDIA GPU: every variant against the float64 reference.

Skipped unless MLX has a CUDA device. Each case draws fresh inputs; the seed is in the
failure message. Every case also checks that dispatch really ran a CUDA kernel (no silent
fallback to the ops backend).
"""

from __future__ import annotations

import pytest

import mlx.core as mx

import mlx_gdn
from mlx_gdn import backends
from mlx_gdn.reference import rel_error
from mlx_gdn.testing import fresh_seed, random_inputs
from mlx_gdn.validate import check_rule

from cuda_cases import DT, RECURRENT, TOL, _reference, check_case
from cuda_cases import (  # noqa: F401  (collected here: the chunked tests, run on the GPU)
    test_chunked,
    test_chunked_exact_zero_gates,
    test_chunked_key,
    test_chunked_key_gates_near_zero_and_one,
    test_chunked_state_in_registers,
    test_chunked_state_in_registers_warps,
    test_chunked_state_slice_widths,
)


def _has_cuda() -> bool:
    from mlx_gdn.cuda.backend import available

    return available()


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not _has_cuda(), reason="needs MLX with a CUDA device")]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel leaves unwritten fails the test."""
    from mlx_gdn import launch

    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("case", RECURRENT, ids=lambda c: "-".join(map(str, c)))
def test_recurrent(case):
    B, T, Hk, Hv, Dk, Dv, dt, gate, masked, fused, lb, neg = case
    check_case("recurrent", B, T, Hk, Hv, Dk, Dv, dt, gate, masked, fused, lb, neg)


@pytest.mark.parametrize("decay", ["one", "slow"])
@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
def test_decay_extremes(algorithm, decay):
    check_case(algorithm, 1, 140, 1, 2, 128, 128, "f32", decay=decay)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_state_across_calls(dtype):
    """Chunked prefill, then recurrent decode steps, equals one long call."""
    seed = fresh_seed()
    B, T, Hk, Hv, D = 2, 133, 2, 4, 128
    x = random_inputs(B, T, Hk, Hv, D, D, dtype=DT[dtype], seed=seed, mask=True)
    yr, sr = _reference(x, True, -5.0, False)
    cut = [0, 120, 121, 124, T]
    ys, s = [], x.state
    for i, (t0, t1) in enumerate(zip(cut[:-1], cut[1:])):
        algo = "chunked" if i == 0 else "recurrent"
        part = lambda a: a[:, t0:t1]  # noqa: E731
        y, s = mlx_gdn.gated_delta_update(
            part(x.q), part(x.k), part(x.v), part(x.a), part(x.b), x.A_log, x.dt_bias, s, part(x.mask),
            lower_bound=-5.0, backend="cuda", algorithm=algo,
        )
        ys.append(y)
    y = mx.concatenate(ys, axis=1)
    mx.eval(y, s)
    ey, es = rel_error(y, yr), rel_error(s, sr)
    tol = TOL[DT[dtype]]
    assert ey < tol and es < tol, f"y err {ey:.2e}, state err {es:.2e}, seed={seed}"


def test_auto_runs_on_cuda():
    x = random_inputs(1, 5, 1, 2, 64, 64, seed=fresh_seed())
    p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    mod, _ = backends.resolve("auto", "auto", p)
    assert mod.name == "cuda"


def test_bad_input_raises_before_launch():
    x = random_inputs(1, 4, 1, 2, 64, 64, seed=fresh_seed())
    with pytest.raises(ValueError, match="state"):
        mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, mx.zeros((1, 2, 64, 32)), backend="cuda")


@pytest.mark.parametrize("offset", [0, 4, 1])
def test_decode_state_views(offset):
    """Decode with the state a view into a wider NaN-padded array: rows that start 16-byte aligned
    (offsets 0 and 4: the 16-byte state loads) or not (offset 1: the element-wise loads)."""
    seed = fresh_seed()
    B, Hk, Hv, D = 2, 2, 4, 128
    x = random_inputs(B, 1, Hk, Hv, D, D, dtype=mx.bfloat16, seed=seed)
    nan = float("nan")
    wide = mx.concatenate([mx.full((B, Hv, D, offset), nan), x.state, mx.full((B, Hv, D, 12 - offset), nan)],
                          axis=-1)
    mx.eval(wide)
    state = wide[..., offset:offset + D]
    y, s = mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, state, backend="cuda")
    yr, sr = _reference(x, True)
    ey, es = rel_error(y, yr), rel_error(s, sr)
    tol = TOL[mx.bfloat16]
    assert ey < tol and es < tol, f"y err {ey:.2e}, state err {es:.2e}, offset {offset}, seed={seed}"


# Fused per-key gates, as Kimi Linear, Kimi K3 and Bailing MoE V3 call them: a [B, T, Hv, Dk],
# A_log [Hv, 1], dt_bias [Hv, Dk] (or per head). T <= 4 takes the decode body, longer T the prefill one.
# (B, T, Hk, Hv, Dk, Dv, dtype, masked, lower_bound, neg, dt_key)
PER_KEY = [
    (1, 1, 32, 32, 128, 128, "bf16", False, -5.0, False, True),
    (16, 1, 8, 8, 128, 128, "bf16", True, None, False, True),
    (2, 3, 2, 4, 64, 64, "f32", True, -5.0, True, False),
    (1, 200, 4, 4, 128, 128, "bf16", False, -5.0, False, True),
    (2, 37, 2, 2, 256, 128, "f32", True, None, True, True),
    (1, 9, 1, 2, 192, 64, "f16", False, -0.5, False, False),
    (3, 1, 2, 2, 32, 32, "f32", True, None, False, True),
]


@pytest.mark.parametrize("case", PER_KEY, ids=lambda c: "-".join(map(str, c)))
def test_recurrent_per_key_fused(case):
    import numpy as np

    from mlx_gdn.reference import delta_rule, gates, to_numpy
    from mlx_gdn.validate import check_update

    B, T, Hk, Hv, Dk, Dv, dt, masked, lb, neg, dt_key = case
    seed = fresh_seed()
    x = random_inputs(B, T, Hk, Hv, Dk, Dv, dtype=DT[dt], seed=seed, mask=masked, fused_gate="key")
    A_log = x.A_log.reshape(Hv, 1)
    dt_bias = x.dt_bias if dt_key else x.dt_bias[:, 0]
    p = check_update(x.q, x.k, x.v, x.a, x.b, A_log, dt_bias, x.state, x.mask, lb, neg)
    for algorithm in ("recurrent", "auto"):  # the chunked kernel refuses per-key gates: auto takes the recurrent one
        mod, algo = backends.resolve("cuda", algorithm, p)
        assert (mod.name, algo) == ("cuda", "recurrent"), f"dispatch sent {p} to {mod.name}/{algo}"
    y, s = mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, A_log, dt_bias, x.state, x.mask, lower_bound=lb,
                                      allow_neg_eigval=neg, backend="cuda", algorithm="recurrent")
    mx.eval(y, s)
    g, beta = gates(x.a, x.b, A_log, dt_bias, lb, neg)
    yr, sr = delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)
    yn, sn = to_numpy(y), to_numpy(s)
    assert np.isfinite(yn).all() and np.isfinite(sn).all(), f"non-finite output, seed={seed}"
    ey, es = rel_error(yn, yr), rel_error(sn, sr)
    msg = f"{case}: y err {ey:.2e}, state err {es:.2e}, seed={seed}"
    print(msg)
    assert ey < TOL[DT[dt]] and es < TOL[DT[dt]], msg
    if masked:
        assert np.all(yn[~(np.asarray(to_numpy(x.mask)) != 0)] == 0), f"masked steps must write y = 0, seed={seed}"


@pytest.mark.parametrize("state_dtype", ["bf16", "f16"])
def test_half_precision_state(state_dtype):
    """A bf16/f16 state: the kernel runs in float32 and the state comes back in its dtype."""
    from mlx_gdn.reference import delta_rule

    seed = fresh_seed()
    x = random_inputs(2, 5, 2, 4, 128, 128, dtype=mx.bfloat16, seed=seed, mask=True)
    st = x.state.astype(DT[state_dtype])
    y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, st, x.mask, backend="cuda")
    assert s.dtype == DT[state_dtype] and y.dtype == mx.bfloat16
    yr, sr = delta_rule(x.q, x.k, x.v, x.g, x.beta, st, x.mask)
    ey, es = rel_error(y, yr), rel_error(s, sr)
    assert ey < 2e-2 and es < 2e-2, f"y {ey:.2e}, state {es:.2e}, seed={seed}"


@pytest.mark.parametrize("model", ["qwen3_5", "olmo_hybrid", "kimi_linear", "kimi_k3", "bailing_moe_v3"])
def test_mlx_lm_model_calls(model):
    """Each mlx-lm model's call on the GPU (kernels) equals mlx-lm's ops path (use_kernel=False)."""
    lm = pytest.importorskip("mlx_lm.models.gated_delta")
    from test_mlx_lm_api import HEADS, _model_inputs

    seed = fresh_seed()
    Hk, Hv = HEADS.get(model, (4, 8))
    for T in (1, 64):
        args, kw, _ = _model_inputs(model, 2, T, Hk, Hv, 128, mx.bfloat16, seed + T, mask=True)
        y, s = mlx_gdn.gated_delta_update(*args, **kw)
        y_lm, s_lm = lm.gated_delta_update(*args, **{**kw, "use_kernel": False})
        m = args[8] if len(args) > 8 else kw["mask"]
        y_lm = mx.where(m[:, :, None, None], y_lm, 0.0).astype(y.dtype)
        ey, es = rel_error(y, y_lm), rel_error(s, s_lm)
        assert ey < 2e-2 and es < 2e-2, f"{model} T={T}: y {ey:.2e}, state {es:.2e}, seed={seed + T}"
# Serving calls (cu_seqlens, state pools, per-step states) on the recurrent kernels, at a real
# layer's head sizes; cases and reference shared with tests/test_serving.py.
from serving_cases import BF16 as _BF16, Case as _Case, check_call as _check_call  # noqa: E402
from serving_cases import make_call as _make_call, run_call as _run_call  # noqa: E402

SERVING = [
    _Case(lens=None, B=64, T=1, Hk=16, Hv=32, Dk=128, Dv=128, dtype=_BF16, pool=160, fused=True),
    _Case(lens=None, B=8, T=5, Hk=2, Hv=4, Dk=128, Dv=128, pool=16, every=1, masked=True),
    _Case(lens=(300, 0, 1, 77), Hk=2, Hv=4, Dk=128, Dv=128, dtype=_BF16, pool=8, every=64),
    _Case(lens=(33, 64, 2), Hk=2, Hv=4, Dk=128, Dv=128, gate="key", every=1, masked=True),
    _Case(lens=(1000, 24), Hk=2, Hv=4, Dk=128, Dv=128, fused=True),
    _Case(lens=(700, 0, 130, 1), Hk=2, Hv=4, Dk=128, Dv=128, dtype=_BF16, pool=6, masked=True),
]


@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
@pytest.mark.parametrize("case", SERVING, ids=[c.label() for c in SERVING])
def test_serving(case, algorithm, monkeypatch):
    from mlx_gdn.ops import backend as ops_backend

    def refuse(*a, **k):
        raise AssertionError("the ops backend ran a serving call meant for CUDA")

    monkeypatch.setattr(ops_backend, "run_serving", refuse)
    monkeypatch.setattr(ops_backend, "run", refuse)
    seed = fresh_seed()
    c = _make_call(case, seed)
    _check_call(c, _run_call(c, "cuda", algorithm), f"seed {seed}, {case.label()}, cuda {algorithm}")
