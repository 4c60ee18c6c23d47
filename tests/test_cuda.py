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
