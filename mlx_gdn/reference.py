"""Float64 NumPy reference of the gated delta rule, written from the math alone.

Used by the tests and by the benchmark to check every path before it is timed.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def to_numpy(x) -> np.ndarray:
    """float64 NumPy copy of an mx.array (any float dtype, bfloat16 included) or array-like."""
    try:
        import mlx.core as mx

        if isinstance(x, mx.array):
            return np.array(x.astype(mx.float32), dtype=np.float64)
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x, dtype=np.float64)


def _sigmoid(z):
    # exp only ever sees -|z|, so nothing overflows; for z < 0 the result is e / (1 + e), which
    # keeps its relative precision in the far tail (1 + tanh(z / 2) cancels there: about 1.7e-4
    # relative error at z = -30, larger further out).
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    p = 1.0 / (1.0 + e)
    return np.where(z >= 0, p, e * p)


def gates(a, b, A_log, dt_bias, lower_bound=None, allow_neg_eigval=False):
    """float64 (g, beta) from the raw projections, computed per head (and key column).

    a: [B,T,Hv] (g [B,T,Hv]) or [B,T,Hv,Dk] (g [B,T,Hv,Dk]); b: [B,T,Hv]; A_log: [Hv] or [Hv,1];
    dt_bias: [Hv] or [Hv,1], or [Hv,Dk] with a per-key a.
    """
    a, b, A_log, dt_bias = (to_numpy(x) for x in (a, b, A_log, dt_bias))
    Hv = A_log.size
    A_log = A_log.reshape(Hv)
    if dt_bias.size == Hv:
        dt_bias = dt_bias.reshape(Hv)
    if a.ndim == 4:  # head axis is a's third: per-head values get a key-column axis
        A_log = A_log[:, None]
        if dt_bias.ndim == 1:
            dt_bias = dt_bias[:, None]
    x = a + dt_bias
    rate = np.exp(A_log)
    if lower_bound is None:
        softplus = np.logaddexp(0.0, x)
        g = np.exp(-rate * softplus)
    else:
        g = np.exp(lower_bound * _sigmoid(rate * x))
    beta = _sigmoid(b)
    if allow_neg_eigval:
        beta = 2.0 * beta
    return g, beta


def delta_rule(q, k, v, g, beta, state=None, mask=None) -> Tuple[np.ndarray, np.ndarray]:
    """float64 reference. Shapes as the public API: returns y [B,T,Hv,Dv], state [B,Hv,Dv,Dk]."""
    q, k, v, g, beta = (to_numpy(x) for x in (q, k, v, g, beta))
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    rep = Hv // Hk
    S = np.zeros((B, Hv, Dv, Dk)) if state is None else to_numpy(state).copy()
    m = np.ones((B, T), bool) if mask is None else np.asarray(to_numpy(mask) != 0)
    y = np.zeros((B, T, Hv, Dv))
    for bi in range(B):
        for h in range(Hv):
            hk = h // rep
            s = S[bi, h]
            for t in range(T):
                if not m[bi, t]:
                    continue
                gt = g[bi, t, h]
                s = s * (gt if np.ndim(gt) == 0 else gt[None, :])
                kt = k[bi, t, hk]
                delta = beta[bi, t, h] * (v[bi, t, h] - s @ kt)
                s = s + np.outer(delta, kt)
                y[bi, t, h] = s @ q[bi, t, hk]
            S[bi, h] = s
    return y, S


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref|| over all elements (0 when both are zero)."""
    out, ref = to_numpy(out), to_numpy(ref)
    den = np.linalg.norm(ref)
    num = np.linalg.norm(out - ref)
    return float(num / den) if den > 0 else float(num)
