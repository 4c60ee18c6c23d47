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
    dt_bias: [Hv] or [Hv,1], or [Hv,Dk] with a per-key a. The formulas: docs/design.md, "The math".
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


def gated_rms_norm(x, z, weight, eps: float, sigmoid: bool = False):
    """float64 gated RMS norm over the last axis: x / sqrt(mean(x^2) + eps) * weight * silu(z)
    (the Qwen layers' output norm), or with `sigmoid` times sigmoid(z) (the Kimi and Bailing
    layers'). x, z [..., D]; weight [D]."""
    x, z, weight = to_numpy(x), to_numpy(z), to_numpy(weight)
    gate = _sigmoid(z) if sigmoid else z * _sigmoid(z)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight * gate


def layer_prep(qkv, conv_state, w, mask, Hk: int, Dk: int, Dv: int, eps: float = 1e-6):
    """float64 layer inputs of the recurrence from the projections' outputs over S tokens: depthwise
    causal conv over the conv state and the inputs (masked inputs as zeros), SiLU, split into q, k,
    v, q/k normalisation (q scaled by Dk**-0.5). qkv [B,S,C]; conv_state [B,K-1,C]; w [C,K,1];
    mask [B,S] or None. Returns (q [B,S,Hk,Dk], k [B,S,Hk,Dk], v [B,S,Hv,Dv], new conv state
    [B,K-1,C]: the last K-1 inputs)."""
    x = to_numpy(qkv)
    if mask is not None:
        x = np.where(np.asarray(to_numpy(mask) != 0)[..., None], x, 0.0)
    inp = np.concatenate([to_numpy(conv_state), x], axis=1)  # [B, K-1+S, C]
    wk = to_numpy(w)[:, :, 0]  # [C, K]
    K, (B, S, _) = wk.shape[1], x.shape
    conv = sum(inp[:, j : j + S] * wk[:, j] for j in range(K))
    act = conv * _sigmoid(conv)
    kd = Hk * Dk
    q = act[..., :kd].reshape(B, S, Hk, Dk)
    k = act[..., kd : 2 * kd].reshape(B, S, Hk, Dk)
    v = act[..., 2 * kd :].reshape(B, S, -1, Dv)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + eps) * Dk**-0.5
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + eps)
    return q, k, v, inp[:, S:]


def layer_step(qkv, conv_state, w, a, b, A_log, dt_bias, state, mask, Hk: int, Dk: int, Dv: int, eps: float = 1e-6,
               norm=None, lower_bound=None, allow_neg_eigval=False):
    """float64 T=1 step of the drop-in layer from its projections' outputs: conv-state shift,
    depthwise conv, SiLU, split into q, k, v, q/k normalisation (q scaled by Dk**-0.5), gating and
    one recurrence step. qkv [B,1,C]; conv_state [B,K-1,C]; w [C,K,1]; a [B,1,Hv] or [B,1,Hv,Dk],
    b [B,1,Hv]; A_log, dt_bias, lower_bound, allow_neg_eigval as `gates`;
    state [B,Hv,Dv,Dk] or None; mask [B,1] or None (a masked row shifts a zero input in);
    norm: (z [B,1,Hv,Dv], weight [Dv], norm eps[, sigmoid dtype]) or None: y then goes through
    `gated_rms_norm`, with the sigmoid gate where a sigmoid dtype is given (not None).
    Returns (y [B,1,Hv,Dv], new conv state [B,K-1,C], new state [B,Hv,Dv,Dk])."""
    if norm is not None:
        y, conv, S = layer_step(qkv, conv_state, w, a, b, A_log, dt_bias, state, mask, Hk, Dk, Dv, eps,
                                lower_bound=lower_bound, allow_neg_eigval=allow_neg_eigval)
        return gated_rms_norm(y, *norm[:3], sigmoid=len(norm) > 3 and norm[3] is not None), conv, S
    q, k, v, conv = layer_prep(qkv, conv_state, w, mask, Hk, Dk, Dv, eps)
    m = None if mask is None else np.asarray(to_numpy(mask) != 0)
    g, beta = gates(a, b, A_log, dt_bias, lower_bound, allow_neg_eigval)
    y, S = delta_rule(q, k, v, g, beta, state, m)
    return y, conv, S


def delta_rule_steps(q, k, v, g, beta, state=None, mask=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`delta_rule` that also returns the state after every token: states [B, T, Hv, Dv, Dk]
    (a masked token's is the one before it)."""
    q, k, v, g, beta = (to_numpy(x) for x in (q, k, v, g, beta))
    B, T = q.shape[:2]
    Hv, Dv, Dk = v.shape[2], v.shape[3], q.shape[3]
    S = np.zeros((B, Hv, Dv, Dk)) if state is None else to_numpy(state)
    m = None if mask is None else np.asarray(to_numpy(mask) != 0)
    ys, states = np.zeros((B, T, Hv, Dv)), np.zeros((B, T, Hv, Dv, Dk))
    for t in range(T):
        sl = slice(t, t + 1)
        y, S = delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], S, None if m is None else m[:, sl])
        ys[:, t], states[:, t] = y[:, 0], S
    return ys, S, states
