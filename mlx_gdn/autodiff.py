"""Gradients for every path: each call's forward wrapped in `mx.custom_function` whose VJP is
the backend's own chunked backward where it has one that takes the problem (a module attribute
`chunked_backward` with `supports(p)` and `chunked_vjp(p, ...)`), else the chunked backward in MLX
ops (`ops.chunked_backward`). Below the ops backend's chunked crossover, its recurrence is
differentiated by MLX autodiff directly (it keeps the forward's steps: as fast as mlx-lm's autodiff
there, where the chunked backward would run the forward again; bench/NOTES.md).

Kernel launches have no VJP in MLX, and autodiff through the ops recurrence keeps one Dv x Dk
state per step (O(T Dk Dv) memory); every chunked backward keeps one per chunk. The kernel ones
(`cuda.chunked_backward`, `metal.chunked_backward`: per-head gates) recompute the chunk operands
and states with the forward's own launches; the ops one serves per-key gates and the ops paths.
Measured on the CPU (T=4096, Hk=2, Hv=4, Dk=Dv=64, float32), forward and backward peaked at 133 MB
through it after the ops chunked forward, 246 MB by autodiff through the ops chunked form and
3.5 GB by autodiff through the ops recurrence (bench/NOTES.md).
The fused gates chain through `gating.compute_gates` by MLX autodiff; the mask is a constant.
"""

from __future__ import annotations

from typing import Tuple

import mlx.core as mx

from . import backends
from .gating import FusedGating, compute_gates
from .ops.chunked_backward import chunked_vjp
from .validate import Problem


def run(p: Problem, mod, algorithm: str, q, k, v, state, mask, *, g=None, beta=None, gating=None) -> Tuple[mx.array, mx.array]:
    """`mod.run(p, ...)` with a VJP: (y [B,T,Hv,Dv] in q's dtype, state [B,Hv,Dv,Dk] float32).

    Gradients reach q, k, v, state and g, beta (or a, b, A_log, dt_bias of `gating`); the mask
    is a constant.
    """
    if mod.name == "ops" and algorithm == "recurrent" and _short(p):
        # The recurrence's own autodiff keeps the forward's steps, where a chunked backward would
        # run the forward again: faster below the chunked crossover, whose memory it bounds.
        return mod.run(p, q, k, v, state, mask, algorithm=algorithm, g=g, beta=beta, gating=gating)
    if gating is None:
        return _rule(p, mod, algorithm, mask)(q, k, v, g, beta, state)
    fused = _update(p, mod, algorithm, mask, gating.lower_bound, gating.allow_neg_eigval)
    return fused(q, k, v, gating.a, gating.b, gating.A_log, gating.dt_bias, state)


def _short(p: Problem) -> bool:
    """T below the ops backend's chunked crossover for p's dtype (where `auto` runs the recurrence)."""
    t0 = backends.chunked_from("ops", p.dtype)
    return t0 is not None and p.T < t0


def _vjp(p: Problem, mod):
    """chunked_vjp(q, k, v, g, beta, state, mask, dy, dstate) for a call on backend module `mod`."""
    kernel = getattr(mod, "chunked_backward", None)
    if kernel is not None and kernel.supports(p):
        return lambda *args: kernel.chunked_vjp(p, *args)
    return chunked_vjp


def _rule(p, mod, algorithm, mask):
    @mx.custom_function
    def forward(q, k, v, g, beta, state):
        return tuple(mod.run(p, q, k, v, state, mask, algorithm=algorithm, g=g, beta=beta))

    @forward.vjp
    def backward(primals, cotangents, outputs):
        q, k, v, g, beta, state = primals
        dy, dstate = cotangents
        return _vjp(p, mod)(q, k, v, g, beta, state, mask, dy, dstate)

    return forward


def _update(p, mod, algorithm, mask, lower_bound, allow_neg_eigval):
    def gates(a, b, A_log, dt_bias):
        return compute_gates(a, b, A_log, dt_bias, lower_bound, allow_neg_eigval)

    @mx.custom_function
    def forward(q, k, v, a, b, A_log, dt_bias, state):
        gating = FusedGating(a, b, A_log, dt_bias, lower_bound, allow_neg_eigval)
        return tuple(mod.run(p, q, k, v, state, mask, algorithm=algorithm, gating=gating))

    @forward.vjp
    def backward(primals, cotangents, outputs):
        q, k, v, a, b, A_log, dt_bias, state = primals
        dy, dstate = cotangents
        g, beta = gates(a, b, A_log, dt_bias)
        dq, dk, dv, dg, dbeta, ds = _vjp(p, mod)(q, k, v, g, beta, state, mask, dy, dstate)
        _, (da, db, dA_log, ddt_bias) = mx.vjp(gates, [a, b, A_log, dt_bias], [dg, dbeta])
        return dq, dk, dv, da, db, dA_log, ddt_bias, ds

    return forward
