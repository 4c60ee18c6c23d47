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
    from mlx_gdn.cuda import available

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


@pytest.mark.parametrize("poison", [True, False])
def test_compiled_launches_equal_plain(poison, monkeypatch):
    """Launches through mx.compile (cuda.COMPILE_LAUNCHES, `launch.BoundLaunch`) give the plain launch's
    outputs bit for bit: recurrent decode (fused and precomputed gates, masked) and the fused
    layer step. With `poison` off the unpoisoned compiled launch is the one compared."""
    import numpy as np

    from mlx_gdn import cuda, decode_layer, launch

    monkeypatch.setattr(launch, "POISON_OUTPUTS", poison)
    seed = fresh_seed()
    x = random_inputs(3, 2, 2, 4, 128, 64, dtype=mx.bfloat16, seed=seed, mask=True)
    B, Hk, Hv, Dk, Dv, K = 3, 2, 4, 128, 64, 4
    C = 2 * Hk * Dk + Hv * Dv
    rng = np.random.default_rng(seed)
    qkv = mx.array(rng.standard_normal((B, 1, C)), dtype=mx.bfloat16)
    conv = mx.array(rng.standard_normal((B, K - 1, C)), dtype=mx.bfloat16)
    w = mx.array(0.3 * rng.standard_normal((C, K, 1)), dtype=mx.bfloat16)

    def outputs():
        backends.clear_plans()
        one = [x.q[:, :1], x.k[:, :1], x.v[:, :1]]
        return [
            *mlx_gdn.gated_delta_update(*one, x.a[:, :1], x.b[:, :1], x.A_log, x.dt_bias, x.state, backend="cuda"),
            *mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask,
                                        lower_bound=-3.0, backend="cuda", algorithm="recurrent"),
            *mlx_gdn.gated_delta_rule(*one, x.g[:, :1], x.beta[:, :1], x.state, backend="cuda"),
            *decode_layer.decode_step("cuda", qkv, conv, w, x.a[:, :1], x.b[:, :1], x.A_log, x.dt_bias, x.state,
                                      None, Hk, Hv, Dk, Dv),
        ]

    made = []
    real = launch.BoundLaunch.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(launch.BoundLaunch, "__init__", spy)
    monkeypatch.setattr(cuda, "COMPILE_LAUNCHES", True)
    fast = outputs()
    mx.eval(fast)
    assert len(made) == 4, len(made)
    for b in made:  # every launch really went through mx.compile
        assert b.compiled and b.fallback is None, b.fallback
    made.clear()
    monkeypatch.setattr(cuda, "COMPILE_LAUNCHES", False)
    plain = outputs()
    assert len(made) == 4 and not any(b.compiled for b in made)
    mx.eval(fast, plain)
    for i, (f, p) in enumerate(zip(fast, plain)):
        assert f.shape == p.shape and f.dtype == p.dtype, i
        assert bool(mx.array_equal(f, p)), f"output {i} differs (seed={seed})"
        assert not bool(mx.any(mx.isnan(f.astype(mx.float32)))), f"output {i} has NaN (seed={seed})"
