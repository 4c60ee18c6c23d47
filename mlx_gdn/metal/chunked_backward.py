"""The chunked backward as Metal kernels (scalar gates): `chunked_vjp`, picked by `autodiff`.

Four launches, the stages of the analytic backward of a chunk:
1. recompute: kernels/chunked/kkt_solve_wy.metal with GDN_BACKWARD (the forward's launch 1, its
   kkt_solve stage reused as it is): every chunk's -W, Qe, Uv, Kd, gamma_C, and for the backward
   A (without beta), P, the pairwise decays, T = (I + A)^-1 and the per-step gate operands;
   then the states entering each chunk, by the forward's state pass (state_output.metal) saving
   the state after every chunk (SAVE_EVERY 1);
2. state_backward.metal: the adjoint of the state pass, chunks last to first: dU_n, the adjoint
   dS_{n+1} entering each chunk's local gradients, and dS_0;
3. chunk_grads.metal: every chunk in parallel, dq, dk (per value head, summed here over the value
   heads of a key head), dv, dbeta and the log-decay gradient.
Memory: O(T Hv (Dk + Dv + C)) for the chunk operands and O(T / C * Hv Dv Dk) for the chunk
states and adjoints; never a state per step. Products on simdgroup 8x8 matrices, float32
throughout. The first call of each kernel variant set runs it once on small inputs against the
ops backward (`fallback.tried`); a variant that fails there gives the ops backward, with one warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Tuple

import mlx.core as mx

from .. import backends, fallback
from ..launch import LaunchSpec
from ..validate import Problem
from .chunked import CHUNK, NSG, _rows_per_tile, _specs, supports_chunked
from .kernel import kernel

# g below this runs the backward at this value (the ops backward's convention,
# `ops.chunked_backward._G_FLOOR`): dg = dlog g / g stays finite at g = 0.
G_FLOOR = 1e-30
_BWD_OUTPUTS = ("akk", "aqk", "decay", "tin", "gts")
# Variant sets already warned about (until `backends.clear_plans`, which also clears the verdicts).
_WARNED: set = set()
backends.on_clear(_WARNED.clear)


def supports(p: Problem) -> bool:
    """Scalar gates on shapes the chunked Metal forward takes; per-key gates keep the ops backward."""
    return p.gate == "scalar" and supports_chunked(p)


def launch_specs_backward(p: Problem) -> Tuple[LaunchSpec, LaunchSpec, LaunchSpec, LaunchSpec]:
    """(recompute, state pass, state_backward, chunk_grads) launch specs of the backward of a call
    on `p`; the state pass is None for a single chunk (its start state is the initial state)."""
    C, N, f32 = CHUNK, -(-p.T // CHUNK), mx.float32
    B, Hk, Hv, Dk, Dv = p.B, p.Hk, p.Hv, p.Dk, p.Dv
    # The backward is handed g and beta (fused gates are formed by MLX ops, whose VJP chains dg).
    fwd, starts = _specs(dataclasses.replace(p, fused=False), N, save_every=1)
    per_chunk = (B, Hv, N)
    recompute = dataclasses.replace(
        fwd,
        name=fwd.name + "_bwd",
        defines=fwd.defines + (("GDN_BACKWARD", 1), ("GDN_G_FLOOR", G_FLOOR)),
        output_names=fwd.output_names + _BWD_OUTPUTS,
        output_shapes=fwd.output_shapes + ((*per_chunk, C, C),) * 4 + ((*per_chunk, 5, C),),
        output_dtypes=fwd.output_dtypes + (f32,) * 5,
    )
    RV = _rows_per_tile(Dk, Dv)
    state = LaunchSpec(
        name="gdn_chunked_state_backward",
        body="chunked/state_backward.metal",
        headers=(),
        defines=(),
        input_names=("wq", "kd", "gc", "aqk", "gts", "dy", "dstate"),
        output_names=("dsn", "du", "dyc", "dstate0"),
        template=(("C", C), ("Dk", Dk), ("Dv", Dv), ("Hv", Hv), ("RV", RV), ("NSG", NSG)),
        grid=(32 * NSG * (Dv // RV), Hv, B),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=((*per_chunk, Dv, Dk), (*per_chunk, C, Dv), (*per_chunk, C, Dv), (B, Hv, Dv, Dk)),
        output_dtypes=(f32,) * 4,
        ensure_row_contiguous=True,
    )
    grads = LaunchSpec(
        name="gdn_chunked_chunk_grads",
        body="chunked/chunk_grads.metal",
        headers=(),
        defines=(),
        input_names=("q", "k", "v", "wq", "uy", "akk", "aqk", "decay", "tin", "gts", "state_in", "saved", "dsn",
                     "du", "dyc"),
        output_names=("dq", "dk", "dv", "dbeta", "dlg", "wk"),
        template=(("InT", p.dtype), ("C", C), ("Dk", Dk), ("Dv", Dv), ("Hk", Hk), ("Hv", Hv), ("NSG", NSG)),
        grid=(32 * NSG * N, Hv, B),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=((B, p.T, Hv, Dk), (B, p.T, Hv, Dk), (B, p.T, Hv, Dv), (B, p.T, Hv), (B, p.T, Hv),
                       (*per_chunk, C * (2 * Dv + 4 * Dk))),
        output_dtypes=(f32,) * 6,
        ensure_row_contiguous=True,
    )
    return recompute, (starts if N > 1 else None), state, grads


def variants(p: Problem):
    """The kernel variants (`fallback.Variant`) the backward of a call on `p` launches."""
    return tuple(fallback.variant(s.name, s.template, s.header(), s.source())
                 for s in launch_specs_backward(p) if s is not None)


def _launch(spec: LaunchSpec, arrays):
    return spec.launch(kernel(spec), arrays)


def kernel_vjp(p: Problem, q, k, v, g, beta, state, mask, dy, dstate) -> Tuple[mx.array, ...]:
    """(dq, dk, dv, dg, dbeta, dstate0) from the four launches, without the trial launch; the
    arguments and results as `chunked_vjp`'s."""
    f32 = mx.float32
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), f32)
    if dstate is None:
        dstate = mx.zeros((B, Hv, Dv, Dk), f32)
    recompute, starts, state_bwd, grads = launch_specs_backward(p)
    arrays = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    if mask is not None:
        arrays["mask"] = mask
    wq, uy, kd, gc, akk, aqk, decay, tin, gts = _launch(recompute, arrays)
    state = state.astype(f32)
    if starts is None:  # one chunk: nothing saved is read
        saved = state[:, None]
    else:  # y (the first output) is not needed; the states after chunks 1, 2, ... are
        saved = _launch(starts, {"wq": wq, "uy": uy, "kd": kd, "gc": gc, "state_in": state, "steps": beta})[2]
    dsn, du, dyc, dstate0 = _launch(state_bwd, {"wq": wq, "kd": kd, "gc": gc, "aqk": aqk, "gts": gts, "dy": dy,
                                                "dstate": dstate.astype(f32)})
    dq, dk, dv, dbeta, dlg, _ = _launch(grads, {
        "q": q, "k": k, "v": v, "wq": wq, "uy": uy, "akk": akk, "aqk": aqk, "decay": decay, "tin": tin,
        "gts": gts, "state_in": state, "saved": saved, "dsn": dsn, "du": du, "dyc": dyc,
    })
    R = Hv // Hk
    if R > 1:
        dq = dq.reshape(B, T, Hk, R, Dk).sum(3)
        dk = dk.reshape(B, T, Hk, R, Dk).sum(3)
    dg = dlg / mx.maximum(g.astype(f32), G_FLOOR)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype),
            dbeta.astype(beta.dtype), dstate0)


def _probe(p: Problem) -> Optional[str]:
    """None when the backward's kernels run on small seeded inputs shaped like `p` and agree with
    the ops backward within the package's tolerance, else what went wrong."""
    import numpy as np

    from ..ops.chunked_backward import chunked_vjp as ops_vjp
    from ..reference import rel_error, to_numpy
    from ..testing import random_inputs, tolerance

    T = min(p.T, CHUNK + 3)
    pp = dataclasses.replace(p, B=1, T=T)
    x = random_inputs(1, T, p.Hk, p.Hv, p.Dk, p.Dv, dtype=p.dtype, seed=0, mask=p.masked)
    rng = np.random.default_rng(0)
    dy = mx.array(rng.standard_normal(x.v.shape).astype(np.float32))
    dstate = mx.array(rng.standard_normal(x.state.shape).astype(np.float32))
    args = (x.q, x.k, x.v, x.g, x.beta, x.state, x.mask, dy, dstate)
    try:
        got = [to_numpy(a) for a in kernel_vjp(pp, *args)]
    except Exception as exc:  # noqa: BLE001 -- any failure of the kernels is the verdict
        return fallback.failure_text(exc)
    want = ops_vjp(*args)
    tol = tolerance(p.dtype)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dstate"), got, want):
        if not np.isfinite(a).all():
            return f"non-finite {name} from finite input"
        err = rel_error(a, b)
        if not err < tol:
            return f"wrong result: {name} relative error {err:.1e} against the ops backward (bound {tol:.0e})"
    return None


def chunked_vjp(p: Problem, q, k, v, g, beta, state, mask, dy, dstate) -> Tuple[mx.array, ...]:
    """(dq, dk, dv, dg, dbeta, dstate0) of the gated delta rule, as `ops.chunked_backward.chunked_vjp`.

    q, k [B,T,Hk,Dk], v [B,T,Hv,Dv], g, beta [B,T,Hv] (any float dtypes); state, dstate
    [B,Hv,Dv,Dk] float32; mask [B,T] or None; dy [B,T,Hv,Dv] the cotangent of y. Each gradient has
    its input's shape and dtype (dstate0 float32); masked steps get zeros. A kernel variant set that
    failed its trial here gives the ops backward instead, with one RuntimeWarning.
    """
    vs = variants(p)
    bad = fallback.tried("metal", vs, lambda: _probe(p))
    if bad is not None:
        from ..ops.chunked_backward import chunked_vjp as ops_vjp

        if vs not in _WARNED:
            _WARNED.add(vs)
            warnings.warn(f"mlx_gdn: the Metal chunked backward's kernels {fallback.describe(vs)} failed on this "
                          f"device: {bad}; gradients come from the ops chunked backward instead", RuntimeWarning,
                          stacklevel=2)
        return ops_vjp(q, k, v, g, beta, state, mask, dy, dstate)
    return kernel_vjp(p, q, k, v, g, beta, state, mask, dy, dstate)
