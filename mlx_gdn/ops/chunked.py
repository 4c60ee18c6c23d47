"""The chunked (WY-form) gated delta rule in MLX ops: runs on any device, differentiable.

Within a chunk of C steps starting from state S0, with decay gamma_i (product of the gates
from the chunk start to step i) and A_ij = beta_i (k_i . k_j) gamma_i / gamma_j for j < i,
the per-step corrections u_i solve (I + A) U = diag(beta) (V - diag(gamma) K S0^T). With
T = (I + A)^-1, W = T diag(beta gamma) K and Uv = T diag(beta) V:

    U   = Uv - W S0^T
    Y   = diag(gamma) Q S0^T + (Q K^T * decay) U        (decay_ij = gamma_i / gamma_j, j <= i)
    S_C = gamma_C S0 + U^T diag(gamma_C / gamma) K

All of it except the last line and the S0 products is independent across chunks, so it
runs batched over every chunk at once; the chunk-to-chunk state pass is a loop of small
products. Memory is O(T (Dk + Dv + C)) per head plus one Dv x Dk state per head and chunk.

Stages, named alike in the Metal and CUDA kernels: `kkt_solve` (A and Q K^T with their decays,
then T = (I + A)^-1; `_kkt_scalar` / `_kkt_key`, then `_solve_wy`), `wy` (W and Uv, in
`_solve_wy`), `state` (the pass over chunk states) and `output` (the readout Y, which needs the
state entering its chunk, so it is formed in the same pass: `_state_output`).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional, Tuple

import mlx.core as mx

# Steps per chunk by device type. CPU: measured (bench/NOTES.md, "Chunked prefill"): the
# intra-chunk work grows with C while the state pass does not shrink with it. GPU: 64, the
# usual choice for fewer sequential steps and the CUDA kernels' chunk; not measured here.
CHUNK = {"cpu": 32, "gpu": 64}
_BLOCK = 16  # diagonal blocks of (I + A) inverted by substitution before the block merges
# Per-key gates: which form of stage kkt_solve's products `chunked_rule` uses by default. The
# folded one ran the per-key call at B=1, T=1024, Hk=2, Hv=4, Dk=Dv=128 in 1.69 s against the
# pairwise one's 2.45 s (best of 3 on the 2-core CPU, shared with other jobs at the time; the
# recurrence took 0.43 s there).
KEY_FORM = "folded"


def chunk_len() -> int:
    """Steps per chunk on the default device."""
    return CHUNK["gpu" if mx.default_device().type == mx.gpu else "cpu"]


def _chunk_size(T: int) -> int:
    """Power of two: chunk_len(), or less for short inputs so padding stays small."""
    c, full = 1, chunk_len()
    while c < min(T, full):
        c *= 2
    return c


def _log_gate(g: mx.array) -> mx.array:
    """log g with log 0 = -inf. Never log of 0 itself, so gradients stay finite."""
    pos = g > 0
    return mx.where(pos, mx.log(mx.where(pos, g, 1.0)), -mx.inf)


@lru_cache(maxsize=None)
def _tri_masks(C: int) -> Tuple[mx.array, mx.array]:
    """(strictly lower, lower incl. diagonal) boolean [C, C] masks."""
    i = mx.arange(C)[:, None]
    j = mx.arange(C)[None, :]
    return i > j, i >= j


def _pair_log_decay(lg: mx.array, strict: mx.array, axis: int) -> mx.array:
    """L[i, j] = sum of lg over steps j+1..i (0 for i <= j), as a running sum started at each j.

    Summing per column instead of differencing one cumulative sum keeps the error relative
    to the decay actually applied: a near-zero gate early in a chunk cannot spoil the
    precision of the later pairs, and log 0 = -inf never meets +inf.
    """
    return mx.cumsum(mx.where(strict, lg, 0.0), axis=axis)


def _unit_lower_inverse(A: mx.array) -> mx.array:
    """(I + A)^-1 for A [..., C, C] strictly lower triangular, C a power of two.

    Substitution inside diagonal blocks, then block merges
    [[X, 0], [A21, Y]]^-1 = [[X^-1, 0], [-Y^-1 A21 X^-1, Y^-1]]. Stable where the power
    series of A is not (repeated keys make A's powers grow like binomials).
    """
    C = A.shape[-1]
    s = min(_BLOCK, C)
    nb = C // s
    blocks = mx.stack([A[..., b * s:(b + 1) * s, b * s:(b + 1) * s] for b in range(nb)], axis=-3)
    inv = mx.broadcast_to(mx.eye(s, dtype=A.dtype), blocks.shape)
    rows = [inv[..., 0, :]]
    for i in range(1, s):
        # Row i of the inverse only needs rows < i (A is strictly lower).
        prev = mx.stack(rows, axis=-2)
        rows.append(inv[..., i, :] - (blocks[..., i, :i, None] * prev).sum(-2))
    inv = mx.stack(rows, axis=-2)  # [..., nb, s, s]
    while s < C:
        nb //= 2
        a21 = mx.stack(
            [A[..., (2 * p + 1) * s:(2 * p + 2) * s, 2 * p * s:(2 * p + 1) * s] for p in range(nb)], axis=-3
        )
        x, y = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        z = -((y @ a21) @ x)
        top = mx.concatenate([x, mx.zeros_like(x)], axis=-1)
        bot = mx.concatenate([z, y], axis=-1)
        inv = mx.concatenate([top, bot], axis=-2)
        s *= 2
    return inv[..., 0, :, :]


def _kkt_scalar(q, k, v, lg, beta):
    """Stage kkt_solve's products for a scalar gate, then `_solve_wy`; q, k [B,Hk,1,N,C,Dk],
    v [B,Hk,R,N,C,Dv], lg, beta [B,Hk,R,N,C]."""
    C = q.shape[-2]
    strict, lower = _tri_masks(C)
    L = _pair_log_decay(lg[..., :, None], strict, axis=-2)  # [..., C, C]
    decay = mx.where(lower, mx.exp(L), 0.0)
    G = mx.cumsum(lg, axis=-1)
    gam = mx.exp(G)[..., None]  # [..., C, 1]
    end = mx.exp(L[..., -1, :])[..., None]  # gamma_C / gamma_j, [..., C, 1]
    gam_c = gam[..., -1:, :]  # [..., 1, 1]
    kt = mx.swapaxes(k, -1, -2)
    A = (k @ kt) * decay * beta[..., None]
    P = (q @ kt) * decay
    return _solve_wy(q, k, v, A, P, gam, end, gam_c, beta)


def _kkt_key(q, k, v, lg, beta):
    """Stage kkt_solve's products for a per-key gate, then `_solve_wy`; lg [B,Hk,R,N,C,Dk].
    The pairwise decay has a Dk axis here, so it is formed one chunk at a time to keep memory at
    O(C^2 Dk) per head."""
    C = q.shape[-2]
    strict, lower = _tri_masks(C)
    A_list, P_list = [], []
    N = q.shape[3]
    # Split once (not index per chunk) so the backward pass stays linear in N.
    for qn, kn, lgn in zip(*(mx.split(x, N, axis=3) for x in (q, k, lg))):
        L = _pair_log_decay(lgn[..., 0, :, None, :], strict[..., None], axis=-3)  # [..., C, C, Dk]
        decay = mx.where(lower[..., None], mx.exp(L), 0.0)
        kj = kn[..., 0, None, :, :]  # [..., 1, C, Dk]
        A_list.append((kn[..., 0, :, None, :] * kj * decay).sum(-1))
        P_list.append((qn[..., 0, :, None, :] * kj * decay).sum(-1))
    A = mx.stack(A_list, axis=3) * beta[..., None]
    P = mx.stack(P_list, axis=3)
    G = mx.cumsum(lg, axis=-2)
    gam = mx.exp(G)  # [..., C, Dk]
    gam_c = gam[..., -1:, :]  # [..., 1, Dk]
    # gamma_C / gamma_j per column, as a sum over steps j+1..C-1 (never a difference of sums).
    end = mx.exp(mx.cumsum(lg, axis=-2, reverse=True, inclusive=False))
    return _solve_wy(q, k, v, A, P, gam, end, gam_c, beta)


# The folded per-key form (`_kkt_key_folded`) forms its decays as products of factors in [0, 1];
# a factor below exp(FOLD_LOG_FLOOR) (about 4e-18) is formed as exactly 0. The product it belongs
# to is then below that too (its other factors are at most 1), so the entry of A or P it drops is
# below 4e-18 |k_i| |k_j| against the identity of (I + A): nothing float32 can see, while carrying
# it would put subnormal floats into the products (slow on CPUs without flush-to-zero).
FOLD_LOG_FLOOR = -40.0
_FOLD_BLOCK = 16  # sub-chunk of the folded form: pairs inside one are formed exactly


def _fold_exp(x: mx.array) -> mx.array:
    """exp(x) for x <= 0 (-inf allowed), exactly 0 below FOLD_LOG_FLOOR; finite gradients."""
    keep = x >= FOLD_LOG_FLOOR
    return mx.where(keep, mx.exp(mx.where(keep, x, 0.0)), 0.0)


def _kkt_key_folded(q, k, v, lg, beta):
    """Stage kkt_solve's products for a per-key gate with the decay folded into the operands,
    then `_solve_wy`; same arguments and result as `_kkt_key`.

    The decay between steps j <= i of column d is exp(b_i - b_j), b the cumulative log-gate.
    Folding it as (K * exp(b)) (K * exp(-b))^T overflows for gates near 0, so the chunk is cut
    into sub-chunks of _FOLD_BLOCK steps and every factor is a decay over steps in order, in [0, 1]:
    for i in sub-chunk I and j in an earlier sub-chunk J,
        exp(b_i - b_j) = exp(b_i - e_{I-1}) exp(e_{I-1} - e_J) exp(e_J - b_j),
    with e_J the cumulative log-gate at the end of sub-chunk J: the left factor scales row i of K
    (or Q), the right one row j of K, the middle one is one Dk vector per pair of sub-chunks, and
    the block is a matrix product. Each factor is a sum of log-gates over its own steps (never a
    difference of sums), so log 0 = -inf only ever gives exp(-inf) = 0. Pairs inside one
    sub-chunk take the exact pairwise form of `_kkt_key` (a Dk axis over _FOLD_BLOCK^2 pairs,
    not C^2). Flushing: see FOLD_LOG_FLOOR.
    """
    C, Dk = q.shape[-2], q.shape[-1]
    s = min(_FOLD_BLOCK, C)
    nb = C // s
    pre = lg.shape[:-2]
    blk = lambda x: x.reshape(*x.shape[:-2], nb, s, x.shape[-1])  # noqa: E731  [..., nb, s, Dk]
    lgb = blk(lg)
    qb, kb = blk(q), blk(k)
    # Within each sub-chunk: decay from its start through step i, and from step j to its end.
    left = _fold_exp(mx.cumsum(lgb, axis=-2))
    right = _fold_exp(mx.cumsum(lgb, axis=-2, reverse=True, inclusive=False))
    # Between sub-chunks: decay over the whole sub-chunks strictly between J and I.
    tot = lgb.sum(-2)  # [..., nb, Dk]
    strict_b, _ = _tri_masks(nb)
    between = mx.cumsum(mx.where(strict_b[..., None], tot[..., :, None, :], 0.0), axis=-3)  # [..., I, J, Dk]
    # Shift by one sub-chunk: pair (I, J) needs the sum over J+1..I-1, i.e. entry (I-1, J).
    mid = mx.concatenate([mx.zeros_like(between[..., :1, :, :]), between[..., :-1, :, :]], axis=-3)
    mid = mx.where(strict_b[..., None], _fold_exp(mid), 0.0)  # [..., nb(I), nb(J), Dk]
    kr = (kb * right)[..., None, :, :, :]  # [..., 1, nb(J), s, Dk]
    kr_t = mx.swapaxes(kr, -1, -2)

    def off_diagonal(xb):
        xl = (xb * left)[..., :, None, :, :] * mid[..., :, :, None, :]  # [..., I, J, s, Dk]
        return xl @ kr_t  # [..., I, J, s, s]

    strict_s, lower_s = _tri_masks(s)
    L = _pair_log_decay(lgb[..., :, None, :], strict_s[..., None], axis=-3)  # [..., nb, s, s, Dk]
    dec = mx.where(lower_s[..., None], mx.exp(L), 0.0)
    kj = kb[..., None, :, :]  # [..., nb, 1, s, Dk]

    def assemble(xb):
        full = off_diagonal(xb)  # strictly lower sub-chunk pairs, zero elsewhere
        diag = (xb[..., :, :, None, :] * kj * dec).sum(-1)  # [..., nb, s, s]
        eye = mx.eye(nb, dtype=mx.bool_)[..., None, None]
        full = mx.where(eye, diag[..., :, None, :, :], full)
        return mx.swapaxes(full, -3, -2).reshape(*pre, C, C)

    A = assemble(kb) * beta[..., None]
    P = assemble(qb)
    G = mx.cumsum(lg, axis=-2)
    gam = mx.exp(G)  # [..., C, Dk]
    gam_c = gam[..., -1:, :]  # [..., 1, Dk]
    end = mx.exp(mx.cumsum(lg, axis=-2, reverse=True, inclusive=False))
    return _solve_wy(q, k, v, A, P, gam, end, gam_c, beta)


def _solve_wy(q, k, v, A, P, gam, end, gam_c, beta):
    """The triangular solve (end of stage kkt_solve) and stage wy: from A, P and the decays to the
    per-chunk operands of the state pass."""
    strict, _ = _tri_masks(A.shape[-1])
    Tinv = _unit_lower_inverse(mx.where(strict, A, 0.0))
    W = Tinv @ ((beta[..., None] * gam) * k)  # [..., C, Dk]
    Uv = Tinv @ (beta[..., None] * v)  # [..., C, Dv]
    Qe = gam * q - P @ W  # y's coefficient on S0
    Yv = P @ Uv  # y's part independent of S0
    Kd = end * k  # what each step writes into the chunk-end state
    WQ = mx.concatenate([W, Qe], axis=-2)  # one product with S0 per chunk
    return WQ, Uv, Yv, Kd, gam_c


def _state_output(S, WQ, Uv, Yv, Kd, gam_c):
    """Stages state and output for one chunk. S [B,Hk,R,Dv,Dk]; the rest one chunk's operands."""
    C = Uv.shape[-2]
    X = WQ @ mx.swapaxes(S, -1, -2)  # [..., 2C, Dv]
    U = Uv - X[..., :C, :]
    Y = Yv + X[..., C:, :]
    S = gam_c * S + mx.swapaxes(U, -1, -2) @ Kd
    return Y, S


_kkt_scalar_c = mx.compile(_kkt_scalar)
_kkt_key_c = mx.compile(_kkt_key)
_kkt_key_folded_c = mx.compile(_kkt_key_folded)
_state_output_c = mx.compile(_state_output)
_KEY_FORMS = {"pairwise": _kkt_key_c, "folded": _kkt_key_folded_c}


def _to_chunks(x: mx.array, B, N, C, Hk, R) -> mx.array:
    """[B, N*C, Hk*R, ...] -> [B, Hk, R, N, C, ...]."""
    rest = x.shape[3:]
    x = x.reshape(B, N, C, Hk, R, *rest)
    order = (0, 3, 4, 1, 2) + tuple(range(5, 5 + len(rest)))
    return x.transpose(order)


def float32_tolerance() -> float:
    """Relative error bound of this path for float32 inputs on the current default device.

    1e-4 (the package's float32 contract), except on MLX's CUDA backend with TF32 products
    enabled (MLX's default there; MLX_ENABLE_TF32=0 turns them off): 2e-3.
    """
    from ..cuda.kernel import _device as cuda_available

    on_cuda = mx.default_device().type == mx.gpu and cuda_available()
    tf32 = on_cuda and os.environ.get("MLX_ENABLE_TF32", "1") != "0"
    return 2e-3 if tf32 else 1e-4


def chunked_rule(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    mask: Optional[mx.array] = None,
    key_form: Optional[str] = None,
) -> Tuple[mx.array, mx.array]:
    """Gated delta rule in chunks of up to chunk_len() steps; same contract as `recurrent_rule`.

    q, k: [B,T,Hk,Dk]; v: [B,T,Hv,Dv]; g: [B,T,Hv] or [B,T,Hv,Dk] in [0, 1]; beta: [B,T,Hv];
    state: [B,Hv,Dv,Dk] float32; mask: [B,T] bool/int or None (a masked step leaves the state
    unchanged and writes y = 0). Computes in float32; returns y [B,T,Hv,Dv] in q's dtype and
    the new float32 state.

    Precision: float32 throughout, relative error against a float64 reference below 1e-4
    (about 1e-7 measured on the CPU). Exception: MLX's CUDA backend runs float32 matmuls in
    TF32 unless the environment has MLX_ENABLE_TF32=0 before MLX's first matmul; the stated
    bound there is 2e-3. bf16/fp16 inputs: below 2e-2 on every device.

    key_form (per-key g only): "pairwise" (`_kkt_key`) or "folded" (`_kkt_key_folded`); None
    takes KEY_FORM.
    """
    if key_form is not None and key_form not in _KEY_FORMS:
        raise ValueError(f"key_form must be one of {sorted(_KEY_FORMS)} or None, got {key_form!r}")
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    R = Hv // Hk
    out_dtype = q.dtype
    f32 = mx.float32
    q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
    lg = _log_gate(g)
    if mask is not None:
        # A masked step is an identity step: gate 1, no write; its inputs are ignored.
        m = mask.astype(mx.bool_)
        mq = m[:, :, None, None]
        q, k, v = (mx.where(mq, x, 0.0) for x in (q, k, v))
        mg = m[:, :, None] if lg.ndim == 3 else mq
        lg = mx.where(mg, lg, 0.0)
        beta = mx.where(m[:, :, None], beta, 0.0)
    C = _chunk_size(T)
    N = -(-T // C)
    pad = N * C - T
    if pad:
        # Padded steps are identity steps too (zeros in k, v and beta, log-gate 0).
        padt = lambda x: mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, lg, beta = (padt(x) for x in (q, k, v, lg, beta))
    qc = _to_chunks(q, B, N, C, Hk, 1)  # [B,Hk,1,N,C,Dk]
    kc = _to_chunks(k, B, N, C, Hk, 1)
    vc = _to_chunks(v, B, N, C, Hk, R)  # [B,Hk,R,N,C,Dv]
    lgc = _to_chunks(lg, B, N, C, Hk, R)  # [B,Hk,R,N,C(,Dk)]
    bc = _to_chunks(beta, B, N, C, Hk, R)
    intra = _kkt_scalar_c if g.ndim == 3 else _KEY_FORMS[key_form or KEY_FORM]
    WQ, Uv, Yv, Kd, gam_c = intra(qc, kc, vc, lgc, bc)
    S = state.reshape(B, Hk, R, Dv, Dk)
    # Split once rather than index per chunk: the gradient of each index is a full-size
    # scatter, which would make the backward pass quadratic in the number of chunks.
    parts = [[p.squeeze(3) for p in mx.split(x, N, axis=3)] for x in (WQ, Uv, Yv, Kd, gam_c)]
    ys = []
    for n in range(N):
        y, S = _state_output_c(S, *(p[n] for p in parts))
        ys.append(y)
    y = mx.stack(ys, axis=3)  # [B,Hk,R,N,C,Dv]
    y = y.transpose(0, 3, 4, 1, 2, 5).reshape(B, N * C, Hv, Dv)[:, :T]
    if mask is not None:
        y = mx.where(m[:, :, None, None], y, 0.0)
    return y.astype(out_dtype), S.reshape(B, Hv, Dv, Dk)
