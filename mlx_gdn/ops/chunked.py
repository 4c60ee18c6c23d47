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

Every decay (pairwise, from the chunk start, to the chunk end) is formed by `gating.decay_exp`:
exactly 0 below exp(-40), so no subnormal float enters the products (trained layers' gates drive
most cumulative decays far below float32's normal range, and CPUs run subnormals slower).

Stages, named alike in the Metal and CUDA kernels: `kkt_solve` (A and Q K^T with their decays,
then T = (I + A)^-1; `_kkt_scalar` / `_kkt_key`, then `_solve_wy`), `wy` (W and Uv, in
`_solve_wy`), `state` (the pass over chunk states) and `output` (the readout Y, which needs the
state entering its chunk, so it is formed in the same pass: `_state_output`).
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx

from ..gating import decay_exp

# Steps per chunk by device type. CPU: measured (bench/NOTES.md, "Chunked prefill"): the
# intra-chunk work grows with C while the state pass does not shrink with it. GPU: 64, the
# usual choice for fewer sequential steps; not measured here.
CHUNK = {"cpu": 32, "gpu": 64}
# Per-key gates: which form of stage kkt_solve's products `chunked_rule` uses by default. The
# folded one ran the per-key call at B=1, T=1024, Hk=2, Hv=4, Dk=Dv=128 in 1.69 s against the
# pairwise one's 2.45 s (best of 3 on the 2-core CPU, shared with other jobs at the time; the
# recurrence took 0.43 s there).
KEY_FORM = "folded"
_BLOCK = 16  # diagonal blocks of (I + A) inverted by substitution before the block merges


def chunk_len() -> int:
    """Steps per chunk on the default device."""
    return CHUNK["gpu" if mx.default_device().type == mx.gpu else "cpu"]


def chunk_size(T: int) -> int:
    """Steps per chunk `chunked_rule` uses for T tokens on the default device."""
    return _chunk_size(T)


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


def _unit_lower_inverse(A: mx.array, keep: Optional[mx.array] = None) -> mx.array:
    """(I + A)^-1 for A [..., C, C] strictly lower triangular, C a power of two.

    keep [..., C, C] bool, for a scalar gate: False where the decay between steps i and j was
    flushed to 0. Entry (i, j) of the inverse is a sum of products of A along paths from i to j,
    each carrying that same decay (the pairwise decays telescope), so it is set to 0 there as it
    is formed: products of such entries would go subnormal. Per-key gates mix keys along a path,
    so they have no such mask.
    Substitution inside diagonal blocks, then block merges
    [[X, 0], [A21, Y]]^-1 = [[X^-1, 0], [-Y^-1 A21 X^-1, Y^-1]]. Stable where the power
    series of A is not (repeated keys make A's powers grow like binomials).
    """
    C = A.shape[-1]
    s = min(_BLOCK, C)
    nb = C // s
    diag = lambda M: mx.stack([M[..., b * s:(b + 1) * s, b * s:(b + 1) * s] for b in range(nb)], axis=-3)  # noqa: E731
    flush = (lambda m, x: x) if keep is None else (lambda m, x: mx.where(m, x, 0.0))  # noqa: E731
    blocks, kb = diag(A), None if keep is None else diag(keep)
    inv = mx.broadcast_to(mx.eye(s, dtype=A.dtype), blocks.shape)
    rows = [inv[..., 0, :]]
    for i in range(1, s):
        # Row i of the inverse only needs rows < i (A is strictly lower).
        prev = mx.stack(rows, axis=-2)
        row = inv[..., i, :] - (blocks[..., i, :i, None] * prev).sum(-2)
        rows.append(flush(None if kb is None else kb[..., i, :], row))
    inv = mx.stack(rows, axis=-2)  # [..., nb, s, s]
    while s < C:
        nb //= 2
        low = lambda M: mx.stack(  # noqa: E731
            [M[..., (2 * p + 1) * s:(2 * p + 2) * s, 2 * p * s:(2 * p + 1) * s] for p in range(nb)], axis=-3
        )
        a21, k21 = low(A), None if keep is None else low(keep)
        x, y = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        z = -flush(k21, flush(k21, y @ a21) @ x)
        top = mx.concatenate([x, mx.zeros_like(x)], axis=-1)
        bot = mx.concatenate([z, y], axis=-1)
        inv = mx.concatenate([top, bot], axis=-2)
        s *= 2
    return inv[..., 0, :, :]


def _kkt_scalar(q, k, v, lg, beta, flush=True):
    """Chunk-local quantities for a scalar gate; q, k [B,Hk,1,N,C,Dk], v [B,Hk,R,N,C,Dv],
    lg, beta [B,Hk,R,N,C]. flush: decays below exp(LOG_DECAY_FLOOR) become exact zeros (the
    forward); False keeps them (the backward, whose gradient by a gate near 0 runs through the
    tiny decays that span it)."""
    ex = decay_exp if flush else mx.exp
    C = q.shape[-2]
    strict, lower = _tri_masks(C)
    L = _pair_log_decay(lg[..., :, None], strict, axis=-2)  # [..., C, C]
    decay = mx.where(lower, ex(L), 0.0)
    keep = decay > 0 if flush else None
    G = mx.cumsum(lg, axis=-1)
    gam = ex(G)[..., None]  # [..., C, 1]
    end = ex(L[..., -1, :])[..., None]  # gamma_C / gamma_j, [..., C, 1]
    gam_c = gam[..., -1:, :]  # [..., 1, 1]
    kt = mx.swapaxes(k, -1, -2)
    A = (k @ kt) * decay * beta[..., None]
    P = (q @ kt) * decay
    return _solve_wy(q, k, v, A, P, gam, end, gam_c, beta, keep)


def _kkt_key(q, k, v, lg, beta, flush=True):
    """Chunk-local quantities for a per-key gate; lg [B,Hk,R,N,C,Dk]. The pairwise decay has a
    Dk axis here, so it is formed one chunk at a time to keep memory at O(C^2 Dk) per head.
    flush: as `_kkt_scalar`'s."""
    ex = decay_exp if flush else mx.exp
    C = q.shape[-2]
    strict, lower = _tri_masks(C)
    A_list, P_list = [], []
    N = q.shape[3]
    # Split once (not index per chunk) so the backward pass stays linear in N.
    for qn, kn, lgn in zip(*(mx.split(x, N, axis=3) for x in (q, k, lg))):
        L = _pair_log_decay(lgn[..., 0, :, None, :], strict[..., None], axis=-3)  # [..., C, C, Dk]
        decay = mx.where(lower[..., None], ex(L), 0.0)
        kj = kn[..., 0, None, :, :]  # [..., 1, C, Dk]
        A_list.append((kn[..., 0, :, None, :] * kj * decay).sum(-1))
        P_list.append((qn[..., 0, :, None, :] * kj * decay).sum(-1))
    A = mx.stack(A_list, axis=3) * beta[..., None]
    P = mx.stack(P_list, axis=3)
    G = mx.cumsum(lg, axis=-2)
    gam = ex(G)  # [..., C, Dk]
    gam_c = gam[..., -1:, :]  # [..., 1, Dk]
    # gamma_C / gamma_j per column, as a sum over steps j+1..C-1 (never a difference of sums).
    end = ex(mx.cumsum(lg, axis=-2, reverse=True, inclusive=False))
    return _solve_wy(q, k, v, A, P, gam, end, gam_c, beta)


# The folded per-key form (`_kkt_key_folded`) forms its decays as products of factors in [0, 1];
# a factor below exp(LOG_DECAY_FLOOR) (about 4e-18) is formed as exactly 0 (`decay_exp`). The
# product it belongs to is then below that too (its other factors are at most 1), so the entry of
# A or P it drops is below 4e-18 |k_i| |k_j| against the identity of (I + A): nothing float32 can
# see, while carrying it would put subnormal floats into the products (slow on CPUs without
# flush-to-zero).
_FOLD_BLOCK = 16  # sub-chunk of the folded form: pairs inside one are formed exactly


def _kkt_key_folded(q, k, v, lg, beta, flush=True):
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
    not C^2). Flushing: see LOG_DECAY_FLOOR (flush=False keeps every factor, as `_kkt_scalar`'s).
    """
    ex = decay_exp if flush else mx.exp
    C, Dk = q.shape[-2], q.shape[-1]
    s = min(_FOLD_BLOCK, C)
    nb = C // s
    pre = lg.shape[:-2]
    blk = lambda x: x.reshape(*x.shape[:-2], nb, s, x.shape[-1])  # noqa: E731  [..., nb, s, Dk]
    lgb = blk(lg)
    qb, kb = blk(q), blk(k)
    # Within each sub-chunk: decay from its start through step i, and from step j to its end.
    left = ex(mx.cumsum(lgb, axis=-2))
    right = ex(mx.cumsum(lgb, axis=-2, reverse=True, inclusive=False))
    # Between sub-chunks: decay over the whole sub-chunks strictly between J and I.
    tot = lgb.sum(-2)  # [..., nb, Dk]
    strict_b, _ = _tri_masks(nb)
    between = mx.cumsum(mx.where(strict_b[..., None], tot[..., :, None, :], 0.0), axis=-3)  # [..., I, J, Dk]
    # Shift by one sub-chunk: pair (I, J) needs the sum over J+1..I-1, i.e. entry (I-1, J).
    mid = mx.concatenate([mx.zeros_like(between[..., :1, :, :]), between[..., :-1, :, :]], axis=-3)
    mid = mx.where(strict_b[..., None], ex(mid), 0.0)  # [..., nb(I), nb(J), Dk]
    kr = (kb * right)[..., None, :, :, :]  # [..., 1, nb(J), s, Dk]
    kr_t = mx.swapaxes(kr, -1, -2)

    def off_diagonal(xb):
        xl = (xb * left)[..., :, None, :, :] * mid[..., :, :, None, :]  # [..., I, J, s, Dk]
        return xl @ kr_t  # [..., I, J, s, s]

    strict_s, lower_s = _tri_masks(s)
    L = _pair_log_decay(lgb[..., :, None, :], strict_s[..., None], axis=-3)  # [..., nb, s, s, Dk]
    dec = mx.where(lower_s[..., None], ex(L), 0.0)
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
    gam = ex(G)  # [..., C, Dk]
    gam_c = gam[..., -1:, :]  # [..., 1, Dk]
    end = ex(mx.cumsum(lg, axis=-2, reverse=True, inclusive=False))
    return _solve_wy(q, k, v, A, P, gam, end, gam_c, beta)


def _solve_wy(q, k, v, A, P, gam, end, gam_c, beta, keep=None):
    """From A, P and the decays to the per-chunk operands of the state pass; keep [..., C, C]
    (scalar gate): where the pairwise decay is not flushed."""
    strict, _ = _tri_masks(A.shape[-1])
    Tinv = _unit_lower_inverse(mx.where(strict, A, 0.0), keep)
    W = Tinv @ ((beta[..., None] * gam) * k)  # [..., C, Dk]
    Uv = Tinv @ (beta[..., None] * v)  # [..., C, Dv]
    Qe = gam * q - P @ W  # y's coefficient on S0
    if keep is not None:
        # With a scalar gate, row i of W and Qe carries the decay from the chunk start to step i
        # (gam_i): zero where that was flushed, so that no sub-floor row meets the state.
        live = gam > 0
        W, Qe = mx.where(live, W, 0.0), mx.where(live, Qe, 0.0)
    Yv = P @ Uv  # y's part independent of S0
    # What each step writes into the chunk-end state, transposed ([..., Dk, C]) and made contiguous
    # here, batched, so that the pass's product with it takes no transposed operand.
    KdT = mx.contiguous(mx.swapaxes(end * k, -1, -2))
    WQ = mx.concatenate([W, Qe], axis=-2)  # one product with S0 per chunk
    return WQ, Uv, Yv, KdT, gam_c


def _state_output(St, WQ, Uv, Yv, KdT, gam_c):
    """One chunk of the state pass. St [B,Hk,R,Dk,Dv]: the state transposed, so that no product
    takes a transposed operand (each layout change measured 15-25% less pass time with the CPU's
    BLAS, bench/NOTES.md); the rest one chunk's operands."""
    C = Uv.shape[-2]
    X = WQ @ St  # [..., 2C, Dv]
    U = Uv - X[..., :C, :]
    Y = Yv + X[..., C:, :]
    St = mx.swapaxes(gam_c, -1, -2) * St + KdT @ U
    return Y, St


_kkt_scalar_c = mx.compile(_kkt_scalar)
_kkt_key_c = mx.compile(_kkt_key)
_kkt_scalar_exact_c = mx.compile(partial(_kkt_scalar, flush=False))
_kkt_key_folded_c = mx.compile(_kkt_key_folded)
# Per-key forms of stage kkt_solve: (flushed, exact) compiled functions.
_KEY_FORMS = {
    "pairwise": (_kkt_key_c, mx.compile(partial(_kkt_key, flush=False))),
    "folded": (_kkt_key_folded_c, mx.compile(partial(_kkt_key_folded, flush=False))),
}
_state_output_c = mx.compile(_state_output)


def _to_chunks(x: mx.array, B, N, C, Hk, R) -> mx.array:
    """[B, N*C, Hk*R, ...] -> [B, Hk, R, N, C, ...]."""
    rest = x.shape[3:]
    x = x.reshape(B, N, C, Hk, R, *rest)
    order = (0, 3, 4, 1, 2) + tuple(range(5, 5 + len(rest)))
    return x.transpose(order)


class ChunkLayout(NamedTuple):
    """One call's inputs in float32 chunk layout, masked and padded steps made identity steps.

    qc, kc [B,Hk,1,N,C,Dk]; vc [B,Hk,R,N,C,Dv]; lgc, bc [B,Hk,R,N,C(,Dk)] (log-gate, beta);
    m: the [B,T] bool mask or None; T: the unpadded length.
    """

    qc: mx.array
    kc: mx.array
    vc: mx.array
    lgc: mx.array
    bc: mx.array
    m: Optional[mx.array]
    T: int

    @property
    def N(self) -> int:
        return self.qc.shape[3]

    @property
    def key_gate(self) -> bool:
        return self.lgc.ndim == 6


def to_chunk_layout(q, k, v, g, beta, mask=None) -> ChunkLayout:
    """The chunked form's operands (float32) for inputs shaped as `chunked_rule`'s."""
    B, T, Hk, Dk = q.shape
    R = v.shape[2] // Hk
    f32 = mx.float32
    q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
    lg = _log_gate(g)
    m = None
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
    return ChunkLayout(
        _to_chunks(q, B, N, C, Hk, 1),
        _to_chunks(k, B, N, C, Hk, 1),
        _to_chunks(v, B, N, C, Hk, R),
        _to_chunks(lg, B, N, C, Hk, R),
        _to_chunks(beta, B, N, C, Hk, R),
        m,
        T,
    )


def from_chunk_layout(y: mx.array, lay: ChunkLayout) -> mx.array:
    """[B,Hk,R,N,C,Dv] (values per step in chunk layout) -> [B,T,Hv,Dv] float32, masked steps 0."""
    B, Hk, R, N, C, Dv = y.shape
    y = y.transpose(0, 3, 4, 1, 2, 5).reshape(B, N * C, Hk * R, Dv)[:, : lay.T]
    if lay.m is not None:
        y = mx.where(lay.m[:, :, None, None], y, 0.0)
    return y


def intra_chunk(lay: ChunkLayout, flush: bool = True, key_form: Optional[str] = None):
    """(WQ, Uv, Yv, KdT, gam_c): every chunk's operands of the state pass (see `_state_output`).
    flush=False keeps decays below the floor (for the backward: see `_kkt_scalar`); key_form:
    the per-key form of stage kkt_solve ("pairwise" or "folded"; None takes KEY_FORM)."""
    if lay.key_gate:
        intra = _KEY_FORMS[key_form or KEY_FORM][0 if flush else 1]
    else:
        intra = _kkt_scalar_c if flush else _kkt_scalar_exact_c
    return intra(lay.qc, lay.kc, lay.vc, lay.lgc, lay.bc)


def float32_tolerance() -> float:
    """Relative error bound of this path for float32 inputs on the current default device.

    1e-4 (the package's float32 contract), except on MLX's CUDA backend with TF32 products
    enabled (MLX's default there; MLX_ENABLE_TF32=0 turns them off): 2e-3
    (`mlx_gdn.testing.tolerance` with matmul=True).
    """
    from ..testing import tolerance

    return tolerance(mx.float32, matmul=True)


def chunked_rule(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    mask: Optional[mx.array] = None,
    *,
    every: int = 0,
    key_form: Optional[str] = None,
):
    """Gated delta rule in chunks of up to chunk_len() steps; same contract as `recurrent_rule`.

    key_form (per-key g only): "pairwise" (`_kkt_key`) or "folded" (`_kkt_key_folded`); None
    takes KEY_FORM.

    every: 0, or a multiple of `chunk_size(T)`: then a third value, the states after tokens
    every, 2 every, ... [B, T // every, Hv, Dv, Dk] float32 (the chunk-end states the state
    pass forms anyway).

    q, k: [B,T,Hk,Dk]; v: [B,T,Hv,Dv]; g: [B,T,Hv] or [B,T,Hv,Dk] in [0, 1]; beta: [B,T,Hv];
    state: [B,Hv,Dv,Dk] float32; mask: [B,T] bool/int or None (a masked step leaves the state
    unchanged and writes y = 0). Computes in float32; returns y [B,T,Hv,Dv] in q's dtype and
    the new float32 state.

    Precision: float32 throughout, relative error against a float64 reference below 1e-4
    (about 1e-7 measured on the CPU). Exception: MLX's CUDA backend runs float32 matmuls in
    TF32 unless the environment has MLX_ENABLE_TF32=0 before MLX's first matmul; the stated
    bound there is 2e-3. bf16/fp16 inputs: below 2e-2 on every device.
    """
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    R = Hv // Hk
    if key_form is not None and key_form not in _KEY_FORMS:
        raise ValueError(f"key_form must be one of {sorted(_KEY_FORMS)} or None, got {key_form!r}")
    lay = to_chunk_layout(q, k, v, g, beta, mask)
    WQ, Uv, Yv, KdT, gam_c = intra_chunk(lay, key_form=key_form)
    St = mx.swapaxes(state.reshape(B, Hk, R, Dv, Dk), -1, -2)
    # Split once rather than index per chunk: the gradient of each index is a full-size
    # scatter, which would make the backward pass quadratic in the number of chunks.
    N, C = lay.N, lay.qc.shape[4]
    parts = [[p.squeeze(3) for p in mx.split(x, N, axis=3)] for x in (WQ, Uv, Yv, KdT, gam_c)]
    if every and every % C:
        raise ValueError(f"every must be a multiple of the chunk length {C}, got {every}")
    ys, kept = [], []
    for n in range(N):
        y, St = _state_output_c(St, *(p[n] for p in parts))
        ys.append(y)
        if every and ((n + 1) * C) % every == 0 and (n + 1) * C <= T:
            kept.append(mx.swapaxes(St, -1, -2).reshape(B, Hv, Dv, Dk))
    y = from_chunk_layout(mx.stack(ys, axis=3), lay).astype(q.dtype)
    S = mx.swapaxes(St, -1, -2).reshape(B, Hv, Dv, Dk)
    if not every:
        return y, S
    states = mx.stack(kept, axis=1) if kept else mx.zeros((B, 0, Hv, Dv, Dk), mx.float32)
    return y, S, states
