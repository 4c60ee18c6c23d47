"""Backward pass of the gated delta rule in MLX ops, in the chunked (WY) form.

Memory is O(T (Dk + Dv + C)) per head plus one Dv x Dk state per head and chunk: never a
state per step. Given the cotangents dy, dS_T of (y, S_T):

1. States at the chunk starts, S_0 .. S_{N-1}, by the forward state pass of the chunked form
   (`ops.chunked`), recomputed here so a forward pass of any path (kernel or ops) keeps no
   more than its outputs.
2. Their adjoints, from the last chunk back: with a chunk's operands (`ops.chunked._state_output`)
   S_{n+1} = gam_C S_n + U^T Kd, U = Uv - W S_n^T and y_n = Yv + Qe S_n^T,
   dS_n = gam_C dS_{n+1} + dy_n^T Qe - (Kd dS_{n+1}^T)^T W.
3. With every S_n and dS_{n+1} known the chunks are independent: the gradient of
   <dy, y> + sum_n <dS_{n+1}, S_{n+1}> over all chunks at once, S_n and dS_{n+1} held constant,
   is dq, dk, dv, dg, dbeta (MLX autodiff of the chunk-local algebra: the inverse of (I + A),
   the log-decays, masks and padding, the sum over the value heads sharing a key head), taken
   over groups of GROUP chunks so that one group's autodiff temporaries are alive at a time.
   Up to GROUP chunks, the chunk operands are formed once and serve steps 1-3; beyond, the
   passes take their own undifferentiated copy.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from .chunked import _state_output, _state_output_c, _to_chunks, intra_chunk, to_chunk_layout


_G_FLOOR = 1e-30
_OPERANDS = ("qc", "kc", "vc", "lgc", "bc")
# Chunks whose chunk-local gradients are formed together (0: all chunks at once). Smaller groups
# keep fewer autodiff temporaries alive; measured on the CPU (float32, T=4096, Hv=4, Dk=Dv=64,
# 32-step chunks): peak 152 MB with all 128 chunks at once, 97 MB in groups of 8, 99 MB in groups
# of 32, with the same time (bench/NOTES.md). Not yet measured on a GPU (bench/train_bench.py --group).
GROUP = 8


def _state_adjoint(dS, dy, W, Qe, KdT, gam_c):
    """dS_n from dS_{n+1} for one chunk. dS [B,Hk,R,Dv,Dk]; dy [...,C,Dv]; W, Qe [...,C,Dk];
    KdT [...,Dk,C] (the chunk-end write operand, transposed as the forward pass keeps it)."""
    dU = mx.swapaxes(dS @ KdT, -1, -2)  # [..., C, Dv]
    return gam_c * dS + mx.swapaxes(dy, -1, -2) @ Qe - mx.swapaxes(dU, -1, -2) @ W


_state_adjoint_c = mx.compile(_state_adjoint)


def chunked_vjp(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    mask: Optional[mx.array],
    dy: mx.array,
    dstate: mx.array,
) -> Tuple[mx.array, ...]:
    """(dq, dk, dv, dg, dbeta, dstate0) of the gated delta rule at (q, k, v, g, beta, state, mask).

    Inputs shaped as `ops.chunked.chunked_rule`'s; dy [B,T,Hv,Dv] (any float dtype) and
    dstate [B,Hv,Dv,Dk] are the cotangents of its outputs. Each gradient has its input's shape
    and dtype. Masked steps get zero gradients; key heads shared by several value heads get
    the sum over those heads.
    """
    f32 = mx.float32
    # The chunked form works with log g, whose gradient is lost where g = 0 (log 0 = -inf):
    # there the backward runs at g = 1e-30 instead (states differ by 1e-30 of their size) and
    # passes the gradient straight to g. Below that floor dL/dg changes by O(1e-30) only.
    def floored(g):
        g = g.astype(f32)
        return g + mx.stop_gradient(mx.maximum(g, _G_FLOOR) - g)

    def surrogate(q, k, v, g, beta):
        return _surrogate(q, k, v, floored(g), beta, state, mask, dy, dstate)

    (_, dstate0), grads = mx.value_and_grad(surrogate, argnums=(0, 1, 2, 3, 4))(q, k, v, g, beta)
    return (*grads, dstate0)


def _surrogate(q, k, v, g, beta, state, mask, dy, dstate):
    """(<dy, y> + sum_n <dS_{n+1}, S_{n+1}>, dS_0), with each chunk's start state S_n and the
    adjoint dS_{n+1} of its end state held constant: the gradient of the first with respect to
    q, k, v, g, beta is the VJP. The chunk map is differentiated GROUP chunks at a time."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    R = Hv // Hk
    f32 = mx.float32
    lay = to_chunk_layout(q, k, v, g, beta, mask)
    N = lay.N
    C = lay.qc.shape[4]
    G = GROUP or N
    shared = G >= N
    # One group: the operands serve the constant passes and the differentiated map alike.
    # Several: the passes get their own undifferentiated copy, so that each group's autodiff
    # temporaries live and die with that group.
    ops = intra_chunk(lay if shared else lay._replace(**{f: mx.stop_gradient(getattr(lay, f)) for f in _OPERANDS}),
                      flush=False)
    parts = [[p.squeeze(3) for p in mx.split(mx.stop_gradient(x), N, axis=3)] for x in ops]

    # The forward's state pass carries each state transposed ([..., Dk, Dv]); so do the chunk
    # starts and end adjoints here (the surrogate pairs transposed ends with transposed adjoints).
    St = mx.swapaxes(state.astype(f32).reshape(B, Hk, R, Dv, Dk), -1, -2)
    starts = []
    for n in range(N):
        starts.append(St)
        if n + 1 < N:
            _, St = _state_output_c(St, *(p[n] for p in parts))

    # dy in chunk layout: masked steps wrote y = 0, so their cotangent stops here.
    dy = dy.astype(f32)
    if mask is not None:
        dy = mx.where(mask.astype(mx.bool_)[:, :, None, None], dy, 0.0)
    dyp = mx.pad(dy, [(0, 0), (0, N * C - T), (0, 0), (0, 0)]) if N * C > T else dy
    dyc = _to_chunks(dyp, B, N, C, Hk, R)
    dycs = [p.squeeze(3) for p in mx.split(dyc, N, axis=3)]

    dS = dstate.astype(f32).reshape(B, Hk, R, Dv, Dk)
    ends_bar = [None] * N
    for n in reversed(range(N)):
        ends_bar[n] = mx.swapaxes(dS, -1, -2)
        wq = parts[0][n]
        dS = _state_adjoint_c(dS, dycs[n], wq[..., :C, :], wq[..., C:, :], parts[3][n], parts[4][n])

    starts = mx.stack(starts, axis=3)
    ends_bar = mx.stack(ends_bar, axis=3)
    if shared:
        Y, ends = _state_output(starts, *ops)
        value = (Y * dyc).sum() + (ends * ends_bar).sum()
        return value, dS.reshape(B, Hv, Dv, Dk)
    bounds = list(range(G, N, G))
    groups = zip(*(mx.split(getattr(lay, f), bounds, axis=3) for f in _OPERANDS))
    rest = zip(*(mx.split(x, bounds, axis=3) for x in (starts, ends_bar, dyc)))
    value = 0.0
    for operands, (sg, eg, dg) in zip(groups, rest):
        Y, ends = _state_output(sg, *intra_chunk(lay._replace(**dict(zip(_OPERANDS, operands))), flush=False))
        value = value + (Y * dg).sum() + (ends * eg).sum()
    return value, dS.reshape(B, Hv, Dv, Dk)
