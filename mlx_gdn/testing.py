"""Random inputs shaped like a real layer's, for tests, examples and the benchmark."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

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


# Seeds fresh_seed() gave since the last `drawn_seeds(clear=True)`: the test suite reports them
# with every failure (tests/conftest.py), also where an assertion's message does not.
_DRAWN: List[int] = []


def fresh_seed() -> int:
    """A new seed per call, to be reported with any failure for reproduction."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    _DRAWN.append(seed)
    return seed


def drawn_seeds(clear: bool = False) -> List[int]:
    """The seeds fresh_seed() gave since the last clear (then forgets them when `clear`)."""
    out = list(_DRAWN)
    if clear:
        _DRAWN.clear()
    return out


# The package's contract against the float64 reference: relative error ||out - ref|| / ||ref||
# by input dtype. The one table; tests, the benchmark's check and the doctor read it.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 2e-2}
# The one exception: float32 products formed by mx.matmul run in TF32 (10-bit mantissa) on MLX's
# CUDA backend unless MLX_ENABLE_TF32=0; paths built on them (the ops chunked form) are held to this.
TF32_TOLERANCE = 2e-3


def tf32_products() -> bool:
    """True where float32 mx.matmul runs in TF32: MLX's CUDA backend as the default device, with
    MLX_ENABLE_TF32 not set to 0 (MLX's default there)."""
    from .cuda.kernel import _device as cuda_device

    on_cuda = mx.default_device().type == mx.gpu and cuda_device()
    return on_cuda and os.environ.get("MLX_ENABLE_TF32", "1") != "0"


def tolerance(dtype, *, matmul: bool = False) -> float:
    """Relative-error bound against the float64 reference for inputs of `dtype` (an mx.Dtype or
    its name, "float32", "bfloat16", "float16"). matmul: the path forms float32 products with
    mx.matmul, so on a TF32 device (`tf32_products`) float32 is held to TF32_TOLERANCE."""
    if isinstance(dtype, str):
        dtype = getattr(mx, dtype)
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    if matmul and dtype == mx.float32 and tf32_products():
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def assert_matches_reference(y, state, y_ref, state_ref, dtype, context: str = "", tol: Optional[float] = None) -> None:
    """Assert one call's outputs meet the contract: y in `dtype`, a float32 state, all finite, and
    relative errors of y and state against the float64 reference below `tol` (default: by dtype).
    `context` (seed, shape, ...) goes into the failure message for reproduction."""
    from .reference import rel_error, to_numpy

    tol = tolerance(dtype) if tol is None else tol
    assert y.dtype == dtype and state.dtype == mx.float32, f"{context}: dtypes y {y.dtype}, state {state.dtype}"
    assert np.isfinite(to_numpy(y)).all() and np.isfinite(to_numpy(state)).all(), f"{context}: non-finite output"
    ey, es = rel_error(y, y_ref), rel_error(state, state_ref)
    assert ey < tol and es < tol, f"{context}: relative error y {ey:.2e}, state {es:.2e} (bound {tol:.0e})"


# --- gradients: directional derivatives of the float64 reference ---------------------------------

RULE_INPUTS = ("q", "k", "v", "g", "beta", "state")
UPDATE_INPUTS = ("q", "k", "v", "a", "b", "A_log", "dt_bias", "state")


def loss_weights(x: Inputs, seed: int):
    """(W [B,T,Hv,Dv], V [B,Hv,Dv,Dk]) float32, seeded: the loss L = sum(y W) + sum(state V)
    whose gradients the directional checks compare (W and V are the cotangents of y and state)."""
    rng = np.random.default_rng(seed + 2)
    W = mx.array(rng.standard_normal(x.v.shape).astype(np.float32))
    V = mx.array(rng.standard_normal(x.state.shape).astype(np.float32))
    return W, V


def _reference_loss(vals: dict, mask, W, V, lower_bound, neg) -> float:
    from .reference import delta_rule, gates

    if "a" in vals:
        g, beta = gates(vals["a"], vals["b"], vals["A_log"], vals["dt_bias"], lower_bound, neg)
    else:
        g, beta = vals["g"], vals["beta"]
    y, s = delta_rule(vals["q"], vals["k"], vals["v"], g, beta, vals["state"], mask)
    return float((y * W).sum() + (s * V).sum())


def directional_derivatives(grads: dict, inputs: dict, mask, W, V, seed: int, lower_bound=None, neg: bool = False,
                            eps: float = 1e-5) -> dict:
    """{name: (predicted, reference, scale)} per input X of a call: predicted = <dL/dX, D> from
    `grads`, reference = the central difference of the float64 reference's L = sum(y W) +
    sum(state V) along a seeded random direction D, scale = sum |dL/dX * D| + |reference| (what a
    float32 result is accurate to). `inputs`: the call's inputs by name, `RULE_INPUTS` (g, beta
    precomputed) or `UPDATE_INPUTS` (fused gates, with lower_bound and allow_neg_eigval `neg`);
    a gate g is moved relative to its size so it stays in (0, 1]. A check is degenerate (it
    cannot fail) when |reference| <= 1e-6 * scale."""
    from .reference import to_numpy

    rng = np.random.default_rng(seed + 1)
    m = None if mask is None else to_numpy(mask)
    Wn, Vn = to_numpy(W), to_numpy(V)
    base = {n: to_numpy(a) for n, a in inputs.items()}
    out = {}
    for n, val in base.items():
        d = rng.standard_normal(val.shape)
        d = d * val if n == "g" else d
        gr = to_numpy(grads[n])
        if gr.shape != d.shape:
            raise ValueError(f"d{n} has shape {gr.shape}, its input {d.shape}")
        plus, minus = dict(base), dict(base)
        plus[n], minus[n] = val + eps * d, val - eps * d
        loss = lambda vals: _reference_loss(vals, m, Wn, Vn, lower_bound, neg)  # noqa: E731
        fd = (loss(plus) - loss(minus)) / (2 * eps)
        out[n] = (float((gr * d).sum()), fd, float(np.abs(gr * d).sum()) + abs(fd))
    return out


# --- serving calls (cu_seqlens, state_indices, return_states) and their float64 reference -------


def serving_inputs(lens, B: int, T: int, Hk: int, Hv: int, Dk: int, Dv: int, *, dtype=mx.float32, seed: int = 0,
                   gate: str = "scalar", masked: bool = False, pool: int = 0, with_state: bool = True,
                   fused_gate: str = "scalar"):
    """(x, state, cu_seqlens, state_indices) of one serving call. lens: packed sequence lengths
    (x is then [1, sum(lens), ...], cu_seqlens int32 [N+1]) or None (B rows of T tokens, no
    cu_seqlens). pool: rows S of a state pool [S, Hv, Dv, Dk] read through state_indices int32 [N]
    (a random permutation, one padding slot -1 when N > 1), or 0: state [N, Hv, Dv, Dk] (None
    without `with_state`) and no indices. x as `random_inputs` makes it, without its state."""
    rng = np.random.default_rng(seed + 1)
    if lens is not None:
        B, T = 1, int(sum(lens))
    N = len(lens) if lens is not None else B
    x = random_inputs(B, T, Hk, Hv, Dk, Dv, dtype=dtype, seed=seed, gate=gate, mask=masked and T > 0,
                      with_state=False, fused_gate=fused_gate)
    cu = None if lens is None else mx.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
    state, idx = None, None
    if with_state or pool:
        state = mx.array((rng.standard_normal((pool or N, Hv, Dv, Dk)) * 0.1).astype(np.float32))
    if pool:
        if pool < N:
            raise ValueError(f"pool must have at least N = {N} rows, got {pool}")
        ids = rng.permutation(pool)[:N].astype(np.int32)
        if N > 1:
            ids[rng.integers(N)] = -1
        idx = mx.array(ids)
    return x, state, cu, idx


def serving_reference(q, k, v, g, beta, state, mask, cu_seqlens, state_indices, every):
    """float64 (y, new state, states or None) of a serving call, sequence by sequence through
    `reference.delta_rule_steps`. g, beta precomputed (see `reference.gates`); state: the pool
    (with state_indices) or [N, Hv, Dv, Dk] or None; every: 0, "steps" or an int C (the
    layouts of `mlx_gdn.serving`). Pool rows no sequence writes keep their values."""
    from .reference import delta_rule_steps, to_numpy

    q, k, v, g, beta = (to_numpy(a) for a in (q, k, v, g, beta))
    mask = None if mask is None else to_numpy(mask)
    B, T, Hv, Dv, Dk = q.shape[0], q.shape[1], v.shape[2], v.shape[3], q.shape[3]
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        cu = np.asarray(cu_seqlens, dtype=np.int64)
        seqs = [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]
    C = 0 if not every else (1 if every == "steps" else int(every))
    st = None if state is None else to_numpy(state)
    idx = None if state_indices is None else np.asarray(state_indices)
    y = np.zeros((B, T, Hv, Dv))
    finals = np.zeros((len(seqs), Hv, Dv, Dk))
    states = np.zeros((B, T // C if C else 0, Hv, Dv, Dk))
    off = 0
    for n, (b, s0_, e) in enumerate(seqs):
        if idx is not None:
            s0 = st[idx[n]] if idx[n] >= 0 else np.zeros((Hv, Dv, Dk))
        else:
            s0 = st[n] if st is not None else np.zeros((Hv, Dv, Dk))
        sl = (slice(b, b + 1), slice(s0_, e))
        yr, sr, kept = delta_rule_steps(q[sl], k[sl], v[sl], g[sl], beta[sl], s0[None],
                                        None if mask is None else mask[sl])
        y[b, s0_:e], finals[n] = yr[0], sr[0]
        if C:
            picked = kept[0, C - 1 :: C]
            if cu_seqlens is None:
                states[b] = picked
            else:
                states[0, off : off + len(picked)] = picked
                off += len(picked)
    new = finals
    if idx is not None:
        new = st.copy()
        for n in range(len(seqs)):
            if idx[n] >= 0:
                new[idx[n]] = finals[n]
    return y, new, (states if C else None)
