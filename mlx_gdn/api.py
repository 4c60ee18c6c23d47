"""The two public entry points: validate, pick a path, run it."""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from . import autodiff, backends
from .gating import FusedGating
from .validate import check_rule, check_update, rule_key, update_key


def _run(plan, q, k, v, state, mask, **gates):
    """Run a call's plan, (problem, backend module, algorithm), on its inputs (state None means zeros)."""
    p, mod, algo = plan
    if state is None:
        state = mx.zeros((p.B, p.Hv, p.Dv, p.Dk), dtype=mx.float32)
    if p.T == 0:
        return mx.zeros((p.B, 0, p.Hv, p.Dv), dtype=p.dtype), state
    return autodiff.run(p, mod, algo, q, k, v, state, mask, **gates)


def gated_delta_rule(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
    mask: Optional[mx.array] = None,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Tuple[mx.array, mx.array]:
    """Gated delta rule with precomputed gates.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv] (Hv a multiple of Hk), all one float dtype.
    g: [B, T, Hv] (scalar decay) or [B, T, Hv, Dk] (per-key decay), values in (0, 1].
    beta: [B, T, Hv]. state: [B, Hv, Dv, Dk] float32 or None (zeros). mask: [B, T] bool or None.
    q is expected L2-normalised with ``Dk**-0.5`` folded in (see `normalize_qk`); no scale is applied.
    Returns y [B, T, Hv, Dv] in q's dtype and the new float32 state.
    backend: "auto", "metal", "cuda" or "ops"; algorithm: "auto", "recurrent" or "chunked".
    """
    plan = backends.plan(
        backend, algorithm, rule_key(q, k, v, g, beta, state, mask), lambda: check_rule(q, k, v, g, beta, state, mask)
    )
    return _run(plan, q, k, v, state, mask, g=g, beta=beta)


def gated_delta_update(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: Optional[mx.array] = None,
    mask: Optional[mx.array] = None,
    *,
    lower_bound: Optional[float] = None,
    allow_neg_eigval: bool = False,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Tuple[mx.array, mx.array]:
    """Gated delta rule with the gating fused in (Qwen3.5's form).

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; a, b: [B, T, Hv]; A_log, dt_bias: [Hv].
    g = exp(-exp(A_log) * softplus(a + dt_bias)) (or exp(lower_bound * sigmoid(exp(A_log) * (a + dt_bias)))
    with ``lower_bound``), beta = sigmoid(b) (times 2 with ``allow_neg_eigval``).
    state: [B, Hv, Dv, Dk] float32 or None; mask: [B, T] bool or None.
    Returns y [B, T, Hv, Dv] in q's dtype and the new float32 state.
    """
    plan = backends.plan(
        backend,
        algorithm,
        update_key(q, k, v, a, b, A_log, dt_bias, state, mask, lower_bound, allow_neg_eigval),
        lambda: check_update(q, k, v, a, b, A_log, dt_bias, state, mask, lower_bound, allow_neg_eigval),
    )
    gating = FusedGating(a, b, A_log, dt_bias, lower_bound, allow_neg_eigval)
    return _run(plan, q, k, v, state, mask, gating=gating)
