"""Cases, the check and the chunked tests shared by the GPU tests (test_cuda.py) and the CUDA
simulator's (test_cuda_sim.py), which import the test functions so that each runs them in its own
setting: every output against the float64 reference, with dispatch checked to have reached the
CUDA backend (no silent fallback to the ops backend)."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

import mlx_gdn
from mlx_gdn import backends
from mlx_gdn.reference import delta_rule, gates, rel_error, to_numpy
from mlx_gdn.testing import TOLERANCE, fresh_seed, random_inputs
from mlx_gdn.validate import check_rule, check_update

TOL = TOLERANCE
DT = {"f32": mx.float32, "bf16": mx.bfloat16, "f16": mx.float16}


def _problem(x, fused, lower_bound, neg):
    if fused:
        return check_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask, lower_bound, neg)
    return check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)


def _call(x, fused, algorithm, lower_bound=None, neg=False, state=None, backend="cuda"):
    state = x.state if state is None else state
    if fused:
        return mlx_gdn.gated_delta_update(
            x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, state, x.mask,
            lower_bound=lower_bound, allow_neg_eigval=neg, backend=backend, algorithm=algorithm,
        )
    return mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, state, x.mask, backend=backend, algorithm=algorithm)


def _reference(x, fused, lower_bound=None, neg=False):
    if fused:
        g, beta = gates(x.a, x.b, x.A_log, x.dt_bias, lower_bound, neg)
    else:
        g, beta = x.g, x.beta
    return delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)


def check_case(algorithm, B, T, Hk, Hv, Dk, Dv, dtype, gate="scalar", masked=False, fused=False, lower_bound=None,
           neg=False, decay="mixed"):
    seed = fresh_seed()
    x = random_inputs(B, T, Hk, Hv, Dk, Dv, dtype=DT[dtype], seed=seed, gate=gate, mask=masked, decay=decay)
    p = _problem(x, fused, lower_bound, neg)
    mod, algo = backends.resolve("cuda", algorithm, p)
    assert mod.name == "cuda" and algo == algorithm, f"dispatch sent {p} to {mod.name}/{algo}"
    y, s = _call(x, fused, algorithm, lower_bound, neg)
    mx.eval(y, s)
    assert y.dtype == DT[dtype] and s.dtype == mx.float32
    assert y.shape == (B, T, Hv, Dv) and s.shape == (B, Hv, Dv, Dk)
    yr, sr = _reference(x, fused, lower_bound, neg)
    yn, sn = to_numpy(y), to_numpy(s)
    assert np.isfinite(yn).all() and np.isfinite(sn).all(), f"non-finite output, seed={seed}"
    ey, es = rel_error(yn, yr), rel_error(sn, sr)
    tol = TOL[DT[dtype]]
    msg = (f"{algorithm} B={B} T={T} Hk={Hk} Hv={Hv} Dk={Dk} Dv={Dv} {dtype} gate={gate} masked={masked} "
           f"fused={fused} lb={lower_bound} neg={neg}: y err {ey:.2e}, state err {es:.2e} (tol {tol}), seed={seed}")
    print(msg)
    assert ey < tol and es < tol, msg
    if masked:
        m = np.asarray(to_numpy(x.mask)) != 0
        assert np.all(yn[~m] == 0), f"masked steps must write y = 0, seed={seed}"


# (B, T, Hk, Hv, Dk, Dv, dtype, gate, masked, fused, lower_bound, neg): T <= 4 takes the decode
# body, longer T the staged prefill body.
RECURRENT = [
    (1, 1, 2, 4, 128, 128, "bf16", "scalar", False, True, None, False),
    (16, 1, 2, 4, 128, 128, "bf16", "scalar", False, True, None, False),
    (3, 1, 1, 3, 64, 64, "f32", "scalar", False, False, None, False),
    (2, 1, 3, 3, 256, 192, "f32", "key", False, False, None, False),
    (2, 3, 1, 4, 192, 256, "f16", "scalar", True, True, -4.0, True),
    (1, 4, 2, 2, 64, 128, "f32", "key", True, False, None, False),
    (2, 5, 2, 4, 128, 64, "f32", "scalar", False, True, None, True),
    (1, 37, 1, 2, 256, 256, "bf16", "scalar", True, False, None, False),
    (2, 37, 1, 1, 128, 128, "f32", "scalar", True, True, -2.0, False),
    (1, 66, 2, 6, 64, 192, "f32", "key", False, False, None, False),
    (3, 17, 1, 3, 192, 64, "f16", "key", True, False, None, False),
    (1, 130, 4, 8, 128, 128, "f32", "scalar", False, True, None, True),
    (2, 33, 2, 8, 128, 128, "bf16", "scalar", True, True, -1.0, True),
    (1, 9, 3, 9, 32, 16, "f32", "scalar", False, False, None, False),
]


CHUNKED = [
    (1, 1, 1, 1, 64, 64, "f32", False, False, None, False),
    (1, 64, 2, 4, 128, 128, "bf16", False, False, None, False),
    (2, 65, 1, 2, 128, 128, "f32", True, False, None, False),
    (1, 150, 2, 4, 128, 128, "bf16", False, True, None, False),
    (2, 127, 1, 3, 64, 192, "f32", False, True, -3.0, True),
    (1, 200, 3, 3, 256, 256, "f32", True, False, None, False),
    (1, 100, 1, 4, 192, 64, "bf16", True, True, -1.0, False),
    (3, 70, 2, 2, 256, 128, "f16", False, True, None, True),
    (1, 129, 1, 2, 64, 256, "bf16", True, False, None, True),
    (2, 300, 4, 8, 128, 128, "f32", True, True, None, False),
    (1, 513, 16, 32, 128, 128, "bf16", False, True, None, False),
    # The benchmark's check instance (B=2, T=67, precomputed bf16 gates) once gave NaN here.
    (2, 67, 16, 32, 128, 128, "bf16", False, False, None, False),
]


# The chunked cases the register-state pass takes (bf16 / f16 operands, Dk <= 128), and more of
# its own: f16, Dv of 64 and 192, a single short chunk, lower bound and negative eigenvalues.
CHUNKED_REGS = [c for c in CHUNKED if c[6] != "f32" and c[4] <= 128] + [
    (3, 70, 2, 2, 64, 64, "f16", True, True, None, True),
    (1, 1, 1, 1, 128, 192, "bf16", False, True, -2.0, False),
    (2, 200, 1, 3, 128, 64, "f16", False, False, None, False),
    (1, 191, 2, 2, 64, 192, "bf16", True, True, -1.0, True),
]


# Chunked tests, collected by the modules that import them.


@pytest.mark.parametrize("case", CHUNKED, ids=lambda c: "-".join(map(str, c)))
def test_chunked(case):
    B, T, Hk, Hv, Dk, Dv, dt, masked, fused, lb, neg = case
    check_case("chunked", B, T, Hk, Hv, Dk, Dv, dt, "scalar", masked, fused, lb, neg)


@pytest.mark.parametrize("bv", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_chunked_state_slice_widths(bv, dtype, monkeypatch):
    """Every value-slice width of the state launch (128 runs 8 warps, two per token strip)."""
    from mlx_gdn.cuda import chunked as cuda

    monkeypatch.setattr(cuda, "CHUNK_BV", bv)
    monkeypatch.setattr(cuda, "STATE_REGS", False)  # the shared-memory pass, whatever the shape rule
    check_case("chunked", 2, 150, 2, 4, 128, 128, dtype, "scalar", True, True, None, False)


@pytest.mark.parametrize("case", CHUNKED_REGS, ids=lambda c: "-".join(map(str, c)))
def test_chunked_state_in_registers(case, monkeypatch):
    """The state pass with S in registers (cuda.chunked.STATE_REGS) on the chunked cases it takes."""
    from mlx_gdn.cuda import chunked as cuda

    monkeypatch.setattr(cuda, "STATE_REGS", True)
    B, T, Hk, Hv, Dk, Dv, dt, masked, fused, lb, neg = case
    check_case("chunked", B, T, Hk, Hv, Dk, Dv, dt, "scalar", masked, fused, lb, neg)


@pytest.mark.parametrize("nw", [1, 2, 4, 8])
def test_chunked_state_in_registers_warps(nw, monkeypatch):
    """Every block width of the register-state pass (16 value rows per warp)."""
    from mlx_gdn.cuda import chunked as cuda

    monkeypatch.setattr(cuda, "STATE_REGS", True)
    monkeypatch.setattr(cuda, "STATE_REGS_NW", nw)
    check_case("chunked", 2, 150, 2, 4, 64, 128, "bf16", "scalar", True, True, None, False)


@pytest.mark.parametrize("regs", [False, True])
def test_chunked_exact_zero_gates(regs, monkeypatch):
    """Precomputed gates of exactly 0 (valid: g in [0, 1]), alone, in runs and at a chunk's first
    and last step, next to 1e-30 and exactly 1: finite and as the reference, in both state passes.
    (The kernels take decays as differences of cumulative log-gates, and log 0 is -inf.)"""
    from mlx_gdn.cuda import chunked as cuda

    monkeypatch.setattr(cuda, "STATE_REGS", regs)
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    dtype = "bf16" if regs else "f32"
    x = random_inputs(1, 150, 1, 2, 64, 64, dtype=DT[dtype], seed=seed)
    g = np.asarray(to_numpy(x.g), np.float32)
    g[:, [0, 10, 63, 64, 127]] = 0.0
    g[:, 20:30] = 0.0
    g[:, 30:40] = 1e-30
    g[:, 40:50] = 1.0
    g[rng.random(g.shape) < 0.05] = 0.0
    g = mx.array(g)
    p = check_rule(x.q, x.k, x.v, g, x.beta, x.state, None)
    mod, algo = backends.resolve("cuda", "chunked", p)
    assert mod.name == "cuda" and algo == "chunked", f"dispatch sent {p} to {mod.name}/{algo}"
    y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, g, x.beta, x.state, None, backend="cuda", algorithm="chunked")
    mx.eval(y, s)
    yr, sr = delta_rule(x.q, x.k, x.v, g, x.beta, x.state, None)
    yn, sn = to_numpy(y), to_numpy(s)
    assert np.isfinite(yn).all() and np.isfinite(sn).all(), f"non-finite output, seed={seed}"
    ey, es = rel_error(yn, yr), rel_error(sn, sr)
    assert ey < TOL[DT[dtype]] and es < TOL[DT[dtype]], f"y err {ey:.2e}, state err {es:.2e}, seed={seed}"


# Per-key gates in the chunked kernels: (B, T, Hk, Hv, Dk, Dv, dtype, masked, fused, lower_bound, neg,
# dt_bias per key column).
CHUNKED_KEY = [
    (1, 70, 1, 2, 64, 64, "f32", False, False, None, False, False),
    (2, 130, 1, 2, 64, 128, "bf16", True, False, None, False, False),
    (1, 67, 1, 2, 128, 64, "f16", True, True, None, True, True),
    (1, 100, 2, 2, 64, 64, "f32", False, True, -3.0, False, False),
    (1, 64, 1, 1, 128, 128, "bf16", False, True, None, False, True),
]


@pytest.mark.parametrize("case", CHUNKED_KEY, ids=lambda c: "-".join(map(str, c)))
def test_chunked_key(case):
    """Per-key gates (precomputed g [B,T,Hv,Dk], or fused a [B,T,Hv,Dk] with dt_bias [Hv,Dk] or [Hv])
    in the tensor-core kernels: launch 1 folds the decays into K and Q per 16-row strip."""
    B, T, Hk, Hv, Dk, Dv, dt, masked, fused, lb, neg, dt_key = case
    seed = fresh_seed()
    x = random_inputs(B, T, Hk, Hv, Dk, Dv, dtype=DT[dt], seed=seed, gate="key", mask=masked,
                      fused_gate="key" if fused else "scalar")
    if fused and not dt_key:
        x.dt_bias = x.dt_bias[:, 0]
    p = _problem(x, fused, lb, neg)
    assert p.gate == "key"
    mod, algo = backends.resolve("cuda", "chunked", p)
    assert mod.name == "cuda" and algo == "chunked", f"dispatch sent {p} to {mod.name}/{algo}"
    assert backends.resolve("cuda", "auto", p)[1] == "recurrent", "auto must not pick per-key chunked (unmeasured)"
    y, s = _call(x, fused, "chunked", lb, neg)
    mx.eval(y, s)
    yr, sr = _reference(x, fused, lb, neg)
    yn, sn = to_numpy(y), to_numpy(s)
    assert np.isfinite(yn).all() and np.isfinite(sn).all(), f"non-finite output, seed={seed}"
    ey, es = rel_error(yn, yr), rel_error(sn, sr)
    tol = TOL[DT[dt]]
    assert ey < tol and es < tol, f"{case}: y err {ey:.2e}, state err {es:.2e} (tol {tol}), seed={seed}"
    if masked:
        m = np.asarray(to_numpy(x.mask)) != 0
        assert np.all(yn[~m] == 0), f"masked steps must write y = 0, seed={seed}"


def test_chunked_key_gates_near_zero_and_one():
    """Per-key gates where folding the decay naively overflows: columns of 1e-30, 1e-8 and exactly
    0 for runs longer than a 16-row strip, next to columns of exactly 1, and one alternating."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    x = random_inputs(1, 150, 1, 2, 64, 64, dtype=mx.float32, seed=seed, gate="key")
    g = np.asarray(to_numpy(x.g), np.float32)
    g[..., 0:8] = 1.0
    g[..., 8:12] = 1e-30
    g[..., 12:16] = 1e-8
    g[:, 3:70, :, 16:20] = 0.0
    g[:, ::2, :, 20] = 1e-30
    g[:, 1::2, :, 20] = 1.0
    g[rng.random(g.shape) < 0.05] = 1e-30
    g = mx.array(g)
    y, s = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, g, x.beta, x.state, None, backend="cuda", algorithm="chunked")
    mx.eval(y, s)
    yr, sr = delta_rule(x.q, x.k, x.v, g, x.beta, x.state, None)
    ey, es = rel_error(to_numpy(y), yr), rel_error(to_numpy(s), sr)
    assert ey < TOL[mx.float32] and es < TOL[mx.float32], f"y err {ey:.2e}, state err {es:.2e}, seed={seed}"
