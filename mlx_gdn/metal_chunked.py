"""The chunked form as two Metal kernels (simdgroup 8x8 matrix products), for long prompts.

kernels/chunked_prep.metal computes every chunk's state-independent operands in parallel
(one threadgroup per chunk and head); kernels/chunked_state.metal then carries the state
through the chunks in order (one threadgroup per head and tile of state rows). The math is
that of `ops_chunked`.
"""

from __future__ import annotations

import mlx.core as mx

from .launch import LaunchSpec
from .validate import Problem

CHUNK = 32  # steps per chunk: six C x C float32 matrices must fit in threadgroup memory
NSG = 4  # simdgroups per threadgroup
_STATE_TILE_FLOATS = 4096  # threadgroup floats for the state tile (16 KB)
_INT32_MAX = 2**31 - 1


def _rows_per_tile(Dk: int, Dv: int) -> int:
    """Rows of the state per threadgroup in the state pass: a multiple of 8 dividing Dv."""
    for r in (32, 16, 8):
        if Dv % r == 0 and r * Dk <= _STATE_TILE_FLOATS:
            return r
    return 0


def supports_chunked(p: Problem) -> bool:
    """Scalar gates, Dk and Dv multiples of 8 with Dk <= 512; per-key gates go to ops."""
    if p.gate != "scalar" or p.Dk % 8 or p.Dv % 8 or not _rows_per_tile(p.Dk, p.Dv):
        return False
    N = -(-p.T // CHUNK)
    sizes = (p.B * N * CHUNK * max(p.Hk * p.Dk, p.Hv * p.Dv), p.B * p.Hv * N * 2 * CHUNK * max(p.Dk, p.Dv))
    return max(sizes) <= _INT32_MAX and p.B <= 65535 and p.Hv <= 65535


def _specs(p: Problem, N: int):
    C, RV = CHUNK, _rows_per_tile(p.Dk, p.Dv)
    f32 = mx.float32
    prep = LaunchSpec(
        name="gdn_chunked_prep",
        body="chunked_prep.metal",
        headers=(),
        defines=(),
        input_names=("q", "k", "v", "g", "beta"),
        output_names=("wq", "uy", "kd", "gc"),
        template=(("C", C), ("Dk", p.Dk), ("Dv", p.Dv), ("Hk", p.Hk), ("Hv", p.Hv), ("NSG", NSG)),
        grid=(32 * NSG * N, p.Hv, p.B),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=(
            (p.B, p.Hv, N, 2 * C, p.Dk),
            (p.B, p.Hv, N, 2 * C, p.Dv),
            (p.B, p.Hv, N, C, p.Dk),
            (p.B, p.Hv, N),
        ),
        output_dtypes=(f32, f32, f32, f32),
    )
    state = LaunchSpec(
        name="gdn_chunked_state",
        body="chunked_state.metal",
        headers=(),
        defines=(),
        input_names=("wq", "uy", "kd", "gc", "state_in"),
        output_names=("y", "state_out"),
        template=(("InT", p.dtype), ("C", C), ("Dk", p.Dk), ("Dv", p.Dv), ("Hv", p.Hv), ("RV", RV), ("NSG", NSG)),
        grid=(32 * NSG * (p.Dv // RV), p.Hv, p.B),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=((p.B, N * C, p.Hv, p.Dv), (p.B, p.Hv, p.Dv, p.Dk)),
        output_dtypes=(p.dtype, f32),
    )
    return prep, state


def _launch(spec: LaunchSpec, arrays):
    from .metal import kernel

    return kernel(spec)(
        inputs=spec.inputs(arrays),
        template=list(spec.template),
        grid=spec.grid,
        threadgroup=spec.threadgroup,
        output_shapes=list(spec.output_shapes),
        output_dtypes=list(spec.output_dtypes),
    )


def run_chunked(p: Problem, q, k, v, state, mask, *, g=None, beta=None, gating=None):
    """(y [B,T,Hv,Dv] in p.dtype, state [B,Hv,Dv,Dk] float32) for validated inputs.

    q, k: [B,T,Hk,Dk]; v: [B,T,Hv,Dv]; g, beta: [B,T,Hv] (or `gating`, a FusedGating);
    state: [B,Hv,Dv,Dk] float32; mask: [B,T] or None. The kernels read float32 inputs padded
    to whole chunks, with masked and padded steps turned into identity steps here
    (q = k = v = 0, g = 1, beta = 0), which also makes their y exactly 0.
    """
    if gating is not None:
        g, beta = gating.compute()
    f32 = mx.float32
    q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
    if mask is not None:
        m = mask.astype(mx.bool_)
        mq = m[:, :, None, None]
        q, k, v = (mx.where(mq, x, 0.0) for x in (q, k, v))
        g = mx.where(m[:, :, None], g, 1.0)
        beta = mx.where(m[:, :, None], beta, 0.0)
    N = -(-p.T // CHUNK)
    pad = N * CHUNK - p.T
    if pad:
        widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)  # noqa: E731
        q, k, v, beta = (mx.pad(x, widths(x)) for x in (q, k, v, beta))
        g = mx.pad(g, widths(g), constant_values=1.0)
    prep, st = _specs(p, N)
    wq, uy, kd, gc = _launch(prep, {"q": q, "k": k, "v": v, "g": g, "beta": beta})
    y, state = _launch(st, {"wq": wq, "uy": uy, "kd": kd, "gc": gc, "state_in": state})
    if pad:
        y = y[:, : p.T]
    return y, state
