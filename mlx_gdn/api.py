"""The two public entry points: validate, pick a path, run it."""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from . import backends
from .gating import FusedGating
from .validate import check_rule, check_update, kernel_backend, rule_key, update_key


def _run(plan, q, k, v, state, mask, **gates):
    """Run a call's plan, (problem, backend module, algorithm), on its inputs (state None means zeros)."""
    p, mod, algo = plan
    if state is None:
        state = mx.zeros((p.B, p.Hv, p.Dv, p.Dk), dtype=mx.float32)
    if p.T == 0:
        return mx.zeros((p.B, 0, p.Hv, p.Dv), dtype=p.dtype), state
    if state.dtype != mx.float32:
        return _run_in_float32(p, mod, algo, q, k, v, state, mask, gates)
    return mod.run(p, q, k, v, state, mask, algorithm=algo, **gates)


def _run_in_float32(p, mod, algo, q, k, v, state, mask, gates):
    """A half-precision state: the recurrence runs in float32, the new state returns in its dtype."""
    y, new_state = mod.run(p, q, k, v, state.astype(mx.float32), mask, algorithm=algo, **gates)
    return y, new_state.astype(state.dtype)


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
    use_kernel: bool = True,
) -> Tuple[mx.array, mx.array]:
    """Gated delta rule with precomputed gates.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv] (Hv a multiple of Hk), all one float dtype.
    g: [B, T, Hv] (scalar decay) or [B, T, Hv, Dk] (per-key decay), values in (0, 1].
    beta: [B, T, Hv]. state: [B, Hv, Dv, Dk] in any float dtype (float32, bfloat16, float16) or
    None (zeros); the recurrence runs in float32 whatever its dtype. mask: [B, T] bool or None.
    q is expected L2-normalised with ``Dk**-0.5`` folded in (see `normalize_qk`); no scale is applied.
    Returns y [B, T, Hv, Dv] in q's dtype and the new state in the dtype of the state passed in
    (float32 when state is None).
    backend: "auto", "metal", "cuda" or "ops"; algorithm: "auto", "recurrent" or "chunked".
    use_kernel: False runs the ops path (backend "ops"), as mlx-lm's flag of that name; with an
    explicit "metal" or "cuda" backend it is a ValueError.
    """
    backend = kernel_backend(backend, use_kernel)
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
    use_kernel: bool = True,
) -> Tuple[mx.array, mx.array]:
    """Gated delta rule with the gating fused in; takes every call mlx-lm's models make.

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; b: [B, T, Hv].
    Gates per head (Qwen3.5, Qwen3-Next, OLMo-hybrid): a [B, T, Hv]; A_log, dt_bias [Hv].
    Gates per key column (Kimi Linear, Kimi K3, Bailing MoE V3): a [B, T, Hv, Dk]; A_log [Hv] or
    [Hv, 1]; dt_bias [Hv, Dk] (or [Hv] / [Hv, 1], one value per head).
    g = exp(-exp(A_log) * softplus(a + dt_bias)) (or exp(lower_bound * sigmoid(exp(A_log) * (a + dt_bias)))
    with ``lower_bound``), elementwise per head (and key column); beta = sigmoid(b) (times 2 with
    ``allow_neg_eigval``). Where exp(A_log) overflows float32 the gate keeps its limit.
    state: [B, Hv, Dv, Dk] in any float dtype or None (zeros); the recurrence runs in float32.
    mask: [B, T] bool or None.
    Returns y [B, T, Hv, Dv] in q's dtype and the new state in the dtype of the state passed in
    (float32 when state is None).
    use_kernel: False runs the ops path (mlx-lm's flag; models pass ``not self.training``); with
    an explicit "metal" or "cuda" backend it is a ValueError.
    """
    backend = kernel_backend(backend, use_kernel)
    plan = backends.plan(
        backend,
        algorithm,
        update_key(q, k, v, a, b, A_log, dt_bias, state, mask, lower_bound, allow_neg_eigval),
        lambda: check_update(q, k, v, a, b, A_log, dt_bias, state, mask, lower_bound, allow_neg_eigval),
    )
    gating = FusedGating(a, b, A_log, dt_bias, lower_bound, allow_neg_eigval)
    return _run(plan, q, k, v, state, mask, gating=gating)
