"""Random inputs shaped like a real layer's, for tests, examples and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from .gating import normalize_qk


@dataclass
class Inputs:
    """One call's inputs: q, k, v, g, beta (precomputed) and a, b, A_log, dt_bias (fused)."""

    q: mx.array
    k: mx.array
    v: mx.array
    g: mx.array
    beta: mx.array
    a: mx.array
    b: mx.array
    A_log: mx.array
    dt_bias: mx.array
    state: Optional[mx.array]
    mask: Optional[mx.array]


def random_inputs(
    B: int,
    T: int,
    Hk: int,
    Hv: int,
    Dk: int,
    Dv: int,
    *,
    dtype=mx.float32,
    seed: int = 0,
    gate: str = "scalar",
    decay: str = "mixed",
    with_state: bool = True,
    mask: bool = False,
    fused_gate: str = "scalar",
) -> Inputs:
    """Inputs for one call with q, k normalised as models do.

    decay: "mixed" spreads g over (0, 1] with some steps near 0 and some exactly 1;
    "slow" keeps g in [0.9, 1]; "one" sets g = 1 exactly. gate: "scalar" [B,T,Hv] or "key" [B,T,Hv,Dk].
    mask=True drops a few random steps (with gaps) per sequence. State is float32 [B,Hv,Dv,Dk].
    fused_gate: "scalar" gives a [B,T,Hv], dt_bias [Hv]; "key" gives a [B,T,Hv,Dk] and dt_bias
    [Hv,Dk] (Kimi-style per-key gates; A_log stays [Hv]).
    """
    rng = np.random.default_rng(seed)
    f32 = np.float32
    q = mx.array(rng.standard_normal((B, T, Hk, Dk)).astype(f32))
    k = mx.array(rng.standard_normal((B, T, Hk, Dk)).astype(f32))
    q, k = normalize_qk(q, k)
    v = mx.array(rng.standard_normal((B, T, Hv, Dv)).astype(f32))
    gshape = (B, T, Hv) if gate == "scalar" else (B, T, Hv, Dk)
    if decay == "one":
        g = np.ones(gshape)
    elif decay == "slow":
        g = rng.uniform(0.9, 1.0, gshape)
    else:
        g = rng.uniform(0.05, 1.0, gshape)
        pick = rng.random(gshape)
        g = np.where(pick < 0.1, rng.uniform(1e-6, 1e-2, gshape), g)
        g = np.where(pick > 0.9, 1.0, g)
    beta = rng.uniform(0.0, 1.0, (B, T, Hv))
    a = rng.standard_normal((B, T, Hv)) * 2.0
    b = rng.standard_normal((B, T, Hv)) * 2.0
    A_log = np.log(rng.uniform(0.5, 16.0, (Hv,)))
    dt_bias = rng.standard_normal((Hv,))
    if fused_gate == "key":
        a = rng.standard_normal((B, T, Hv, Dk)) * 2.0
        dt_bias = rng.standard_normal((Hv, Dk))
    state = mx.array(rng.standard_normal((B, Hv, Dv, Dk)).astype(f32) * 0.1) if with_state else None
    m = None
    if mask:
        mm = rng.random((B, T)) > 0.3
        mm[:, 0] = True
        m = mx.array(mm)
    cast = lambda x: mx.array(np.asarray(x, f32)).astype(dtype)  # noqa: E731
    return Inputs(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), cast(g), cast(beta),
        cast(a), cast(b), mx.array(A_log.astype(f32)), mx.array(dt_bias.astype(f32)), state, m,
    )


def fresh_seed() -> int:
    """A new seed per call, to be reported with any failure for reproduction."""
    return int(np.random.SeedSequence().entropy % (2**32))


# The package's contract against the float64 reference (relative error).
TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 2e-2}


def assert_matches_reference(y, state, y_ref, state_ref, dtype, context: str = "", tol: Optional[float] = None) -> None:
    """Assert one call's outputs meet the contract: y in `dtype`, a float32 state, all finite, and
    relative errors of y and state against the float64 reference below `tol` (default: by dtype).
    `context` (seed, shape, ...) goes into the failure message for reproduction."""
    from .reference import rel_error, to_numpy

    tol = TOLERANCE[dtype] if tol is None else tol
    assert y.dtype == dtype and state.dtype == mx.float32, f"{context}: dtypes y {y.dtype}, state {state.dtype}"
    assert np.isfinite(to_numpy(y)).all() and np.isfinite(to_numpy(state)).all(), f"{context}: non-finite output"
    ey, es = rel_error(y, y_ref), rel_error(state, state_ref)
    assert ey < tol and es < tol, f"{context}: relative error y {ey:.2e}, state {es:.2e} (bound {tol:.0e})"
