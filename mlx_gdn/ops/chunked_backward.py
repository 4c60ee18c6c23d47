"""Backward pass of the gated delta rule in MLX ops, in the chunked (WY) form.

Memory is O(T (Dk + Dv + C)) per head plus one Dv x Dk state per head and chunk: never a
state per step. Given the cotangents dy, dS_T of (y, S_T):

1. States at the chunk starts, S_0 .. S_{N-1}, by the forward state pass of the chunked form
   (`ops.chunked`), recomputed here so a forward pass of any path (kernel or ops) keeps no
   more than its outputs.
2. Their adjoints, from the last chunk back: with a chunk's operands (`ops.chunked._pass`)
   S_{n+1} = gam_C S_n + U^T Kd, U = Uv - W S_n^T and y_n = Yv + Qe S_n^T,
   dS_n = gam_C dS_{n+1} + dy_n^T Qe - (Kd dS_{n+1}^T)^T W.
3. With every S_n and dS_{n+1} known the chunks are independent: one vector-Jacobian product
   of the chunk map (q, k, v, g, beta, S_n) -> (y_n, S_{n+1}), batched over all chunks, gives
   dq, dk, dv, dg, dbeta (MLX autodiff of the chunk-local algebra: the inverse of (I + A),
   the log-decays, masks and padding, the sum over the value heads sharing a key head).
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from .chunked import _pass, _pass_c, _to_chunks, from_chunk_layout, intra_chunk, to_chunk_layout


_G_FLOOR = 1e-30


def _state_adjoint(dS, dy, W, Qe, Kd, gam_c):
    """dS_n from dS_{n+1} for one chunk. dS [B,Hk,R,Dv,Dk]; dy [...,C,Dv]; W, Qe, Kd [...,C,Dk]."""
    dU = Kd @ mx.swapaxes(dS, -1, -2)  # [..., C, Dv]
    return gam_c * dS + mx.swapaxes(dy, -1, -2) @ Qe - mx.swapaxes(dU, -1, -2) @ W


_state_adjoint_c = mx.compile(_state_adjoint)


def _chunk_map(q, k, v, g, beta, mask, starts):
    """Every chunk's (y, end state) from its start state; starts [B,Hk,R,N,Dv,Dk].
    Returns y [B,T,Hv,Dv] float32 and the end states, shaped as `starts`."""
    lay = to_chunk_layout(q, k, v, g, beta, mask)
    Y, ends = _pass(starts, *intra_chunk(lay))
    return from_chunk_layout(Y, lay), ends


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
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    R = Hv // Hk
    f32 = mx.float32
    # The chunked form works with log g, whose gradient is lost where g = 0 (log 0 = -inf):
    # there the backward runs at g = 1e-30 instead (states differ by 1e-30 of their size) and
    # passes the gradient straight to g. Below that floor dL/dg changes by O(1e-30) only.
    g = g.astype(f32)
    g = g + mx.stop_gradient(mx.maximum(g, _G_FLOOR) - g)
    lay = to_chunk_layout(q, k, v, g, beta, mask)
    WQ, Uv, Yv, Kd, gam_c = intra_chunk(lay)
    N = lay.N
    C = lay.qc.shape[4]
    parts = [[p.squeeze(3) for p in mx.split(x, N, axis=3)] for x in (WQ, Uv, Yv, Kd, gam_c)]

    S = state.astype(f32).reshape(B, Hk, R, Dv, Dk)
    starts = []
    for n in range(N):
        starts.append(S)
        if n + 1 < N:
            _, S = _pass_c(S, *(p[n] for p in parts))

    # dy in chunk layout: masked steps wrote y = 0, so their cotangent stops here.
    dy = dy.astype(f32)
    if mask is not None:
        dy = mx.where(mask.astype(mx.bool_)[:, :, None, None], dy, 0.0)
    if N * C > T:
        dy = mx.pad(dy, [(0, 0), (0, N * C - T), (0, 0), (0, 0)])
    dyc = [p.squeeze(3) for p in mx.split(_to_chunks(dy, B, N, C, Hk, R), N, axis=3)]

    dS = dstate.astype(f32).reshape(B, Hk, R, Dv, Dk)
    ends_bar = [None] * N
    for n in reversed(range(N)):
        ends_bar[n] = dS
        wq = parts[0][n]
        dS = _state_adjoint_c(dS, dyc[n], wq[..., :C, :], wq[..., C:, :], parts[3][n], parts[4][n])
    dstate0 = dS.reshape(B, Hv, Dv, Dk)

    starts = mx.stack(starts, axis=3)
    ends_bar = mx.stack(ends_bar, axis=3)
    _, grads = mx.vjp(
        lambda q, k, v, g, beta, st: _chunk_map(q, k, v, g, beta, mask, st),
        [q, k, v, g, beta, starts],
        [dy[:, :T], ends_bar],
    )
    dq, dk, dv, dg, dbeta, _ = grads
    return dq, dk, dv, dg, dbeta, dstate0
