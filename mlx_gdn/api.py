"""The two public entry points: validate, pick a path, run it."""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from . import autodiff, planner, serving
from .gating import FusedGating
from .validate import check_rule, check_update, kernel_backend, rule_key, serving_requested, update_key


def _run(plan, q, k, v, state, mask, **gates):
    """Run a call's plan, (problem, backend module, algorithm), on its inputs (state None means zeros)."""
    p, mod, algo = plan
    if state is None:
        state = mx.zeros((p.B, p.Hv, p.Dv, p.Dk), dtype=mx.float32)
    if p.T == 0:
        return mx.zeros((p.B, 0, p.Hv, p.Dv), dtype=p.dtype), state
    if state.dtype != mx.float32:
        return _run_in_float32(p, mod, algo, q, k, v, state, mask, gates)
    return autodiff.run(p, mod, algo, q, k, v, state, mask, **gates)


def _run_in_float32(p, mod, algo, q, k, v, state, mask, gates):
    """A half-precision state: the recurrence runs in float32, the new state returns in its dtype."""
    y, new_state = autodiff.run(p, mod, algo, q, k, v, state.astype(mx.float32), mask, **gates)
    return y, new_state.astype(state.dtype)


def _dt_per_key(a, dt_bias) -> bool:
    """dt_bias holds one value per key column (Kimi's [Hv, Dk] with a per-key a)."""
    return (type(a) is mx.array and type(dt_bias) is mx.array and a.ndim == 4 and dt_bias.ndim == 2
            and dt_bias.shape[-1] != 1)


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
    cu_seqlens: Optional[mx.array] = None,
    state_indices: Optional[mx.array] = None,
    return_states=None,
    check_values: bool = True,
) -> Tuple[mx.array, ...]:
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

    Serving (keyword-only; any of the first three takes the serving path, see `mlx_gdn.serving`):
    cu_seqlens: int32 [N + 1], 0 = c_0 <= ... <= c_N = T; needs B == 1. Sequence n is tokens
    c_n .. c_{n+1} - 1 (lengths 0 and 1 allowed), each from its own initial state; `state` is then
    [N, Hv, Dv, Dk] (or None: zeros) and so is the returned state.
    state_indices: int32 [N] (N = B without cu_seqlens): `state` is a pool [S, Hv, Dv, Dk];
    sequence n starts from row state_indices[n] (negative: zeros, and nothing is written back) and
    the returned state is the pool with those rows replaced by the final states. Rebind the
    pool's name to the result (``y, pool = f(..., state=pool, ...)``) and MLX updates it in place:
    the call evaluates its N final states first (a wait per call) so that the scatter into the
    pool finds no pending read of it, and its cost does not grow with S (under mx.compile the
    scatter copies the pool).
    return_states: "steps" adds a third value [B, T, Hv, Dv, Dk], the state after every token
    (with cu_seqlens: after each packed token); an int C adds [B, T // C, Hv, Dv, Dk], the states
    after tokens C, 2C, ... (with cu_seqlens counted within each sequence: sequence n's
    len_n // C states start at slot `mlx_gdn.serving.boundary_offsets(cu_seqlens, C)[n]`, and the
    slots past the last sequence's are zero). A masked token's state is the one before it.
    check_values: checks cu_seqlens (starts at 0, non-decreasing, ends at T) and state_indices
    (below S, no row twice) by reading them to the host, a sync per call; pass False in a
    server's hot loop once the inputs are known good (bad values then give undefined results).
    On Metal and CUDA, under algorithm "chunked" (asked for, or "auto" at long T), return_states=C
    with C a multiple of the kernels' chunk length runs the chunked kernels, and packed sequences
    without return_states run one chunked call per sequence; other serving calls run on the
    recurrent kernels. The ops backend runs packed sequences one by one (reading cu_seqlens to
    the host).
    """
    backend = kernel_backend(backend, use_kernel)
    if serving_requested(cu_seqlens, state_indices, return_states):
        planned = serving.plan(
            backend, algorithm, rule_key(q, k, v, g, beta, None, mask),
            lambda: check_rule(q, k, v, g, beta, None, mask), state, cu_seqlens, state_indices, return_states,
        )
        return serving.run(planned, q, k, v, state, mask, cu_seqlens, state_indices, check_values, g=g, beta=beta)
    plan = planner.plan(
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
    cu_seqlens: Optional[mx.array] = None,
    state_indices: Optional[mx.array] = None,
    return_states=None,
    check_values: bool = True,
) -> Tuple[mx.array, ...]:
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
    Serving arguments as `gated_delta_rule`.
    """
    backend = kernel_backend(backend, use_kernel)
    if serving_requested(cu_seqlens, state_indices, return_states):
        planned = serving.plan(
            backend, algorithm,
            update_key(q, k, v, a, b, A_log, dt_bias, None, mask, lower_bound, allow_neg_eigval),
            lambda: check_update(q, k, v, a, b, A_log, dt_bias, None, mask, lower_bound, allow_neg_eigval),
            state, cu_seqlens, state_indices, return_states,
        )
        gating = FusedGating(a, b, A_log, dt_bias, lower_bound, allow_neg_eigval)
        return serving.run(planned, q, k, v, state, mask, cu_seqlens, state_indices, check_values, gating=gating)
    plan = planner.plan(
        backend,
        algorithm,
        update_key(q, k, v, a, b, A_log, dt_bias, state, mask, lower_bound, allow_neg_eigval),
        lambda: check_update(q, k, v, a, b, A_log, dt_bias, state, mask, lower_bound, allow_neg_eigval),
        # The fused options that select kernel variants: lower_bound given, allow_neg_eigval, and
        # dt_bias per key column ([Hv, Dk], GDN_DT_KEY) with a per-key a.
        (lower_bound is not None, bool(allow_neg_eigval), _dt_per_key(a, dt_bias)),
    )
    gating = FusedGating(a, b, A_log, dt_bias, lower_bound, allow_neg_eigval)
    return _run(plan, q, k, v, state, mask, gating=gating)
