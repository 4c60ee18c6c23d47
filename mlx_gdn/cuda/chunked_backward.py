"""The chunked backward on CUDA tensor cores (scalar gates): what `autodiff` calls in place of the
ops backward (`ops.chunked_backward`) for calls on the CUDA backend that `supports` takes.

Four launches (kernels/chunked/backward.cuh holds the math):
1. the forward's launch 1 (`chunked.run_kkt_solve_wy`: W, U, Aqk, G), recomputed;
2. the forward's state pass with SAVE_EVERY = 1: the state entering every chunk (one Dv x Dk state
   per chunk, never one per step);
3. stage state_backward (chunks last to first): dU per chunk, the adjoint of every chunk's end
   state, and the initial state's gradient;
4. stage chunk_grads (every chunk in parallel): dq, dk (per value head, summed over the value heads
   of a key head here), dv, dbeta and the log-decay gradient, with T = (I + A)^-1 solved again by
   stage kkt_solve's code.
The log-decay gradient becomes dg = dl / g with the ops backward's floor for g near 0 (the
backward runs at max(g, 1e-30), as `ops.chunked_backward.chunked_vjp` does).

If a kernel fails to compile or run the first time a variant is used, the call (and every later
one of that variant) takes the ops backward, with one RuntimeWarning.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import lru_cache
from typing import Dict, Optional, Tuple

import mlx.core as mx

from .. import backends, launch
from ..ops import chunked_backward as ops_backward
from ..validate import Problem
from . import chunked
from .kernel import _dummy, _kernel, source_text

DIMS = (64, 128)
# Value rows per block of stage state_backward: None picks by parallelism (`_choose_bv`).
BWD_BV: Optional[int] = None

STATE_BWD_INPUTS = ("q", "k", "W", "Aqk", "G", "dy", "mask", "dstate")
STATE_BWD_OUTPUTS = ("dU", "dS", "dS0")
GRADS_INPUTS = ("q", "k", "v", "beta", "W", "U", "Aqk", "G", "state_in", "saved", "dS", "dU", "dy", "mask")
GRADS_OUTPUTS = ("dq", "dk", "dv", "dbeta", "dl")

# Variant key -> None (ran) or the error that sent it to the ops backward.
_VERDICTS: Dict[Tuple, Optional[str]] = {}
backends.on_clear(_VERDICTS.clear)


@lru_cache(maxsize=None)
def header() -> str:
    """The forward's chunked header, then the backward stages."""
    return chunked.header() + source_text("chunked/backward.cuh")


def state_backward_smem(Dk: int, BV: int, exact: bool) -> int:
    """Bytes of shared memory of stage state_backward (gdn_tc::state_backward_smem)."""
    es = 4 if exact else 2
    lk, la = chunked._ld(exact, Dk), chunked._ld(exact, chunked.CHUNK)
    c = chunked.CHUNK
    return BV * (Dk + 8) * 4 + (3 * c * lk + c * la) * es + 2 * c * (BV + 4) * 4 + 3 * c * 4


def chunk_grads_smem(Dk: int, Dv: int, exact: bool) -> int:
    """Bytes of shared memory of stage chunk_grads (gdn_tc::chunk_grads_smem)."""
    es = 4 if exact else 2
    c = chunked.CHUNK
    lk, lx = chunked._ld(exact, Dk), max(Dk, Dv) + 4
    return 2 * c * lk * es + 4 * c * (c + 4) * 4 + 2 * c * lx * 4 + 9 * c * 4 + 4 * 4


def _choose_bv(p: Problem) -> int:
    exact = p.dtype == mx.float32
    if BWD_BV is not None and p.Dv % BWD_BV == 0:
        return BWD_BV
    for bv in (64, 32, 16):
        if p.B * p.Hv * (p.Dv // bv) >= chunked.MIN_STATE_BLOCKS and state_backward_smem(p.Dk, bv, exact) <= chunked.SMEM_LIMIT:
            return bv
    return 16


def _forward_problem(p: Problem) -> Problem:
    # The VJP gets g and beta (fused gates are differentiated by MLX around it).
    return dataclasses.replace(p, fused=False)


def supports(p: Problem) -> bool:
    """Scalar gates, Dk and Dv in {64, 128}, where the forward's chunked launches take the problem
    and no kernel of this shape has failed here."""
    if p.gate != "scalar" or p.Dk not in DIMS or p.Dv not in DIMS:
        return False
    if not chunked.supports_chunked(_forward_problem(p)):
        return False
    if chunk_grads_smem(p.Dk, p.Dv, p.dtype == mx.float32) > chunked.SMEM_LIMIT:
        return False
    return not any(v is not None for k, v in _VERDICTS.items() if k[:6] == _shape_key(p))


def _shape_key(p: Problem) -> Tuple:
    return (mx.fast.cuda_kernel, p.Dk, p.Dv, p.dtype, p.masked, _choose_bv(p))


def _run(p: Problem, q, k, v, g, beta, state, mask, dy, dstate):
    """(dq, dk, dv, dg, dbeta, dstate0) from the four launches (see the module docstring)."""
    f32 = mx.float32
    fp = _forward_problem(p)
    exact = p.dtype == mx.float32
    C = chunked.CHUNK
    nt = -(-p.T // C)
    tp = nt * C
    dummy = _dummy()
    m = mask if mask is not None else dummy
    gf = mx.maximum(g.astype(f32), ops_backward._G_FLOOR)
    outs = chunked.run_kkt_solve_wy(fp, q, k, v, m, g=gf, beta=beta)
    W, U, Aqk, G = outs[:4]
    state = state.astype(f32)
    _, _, saved = chunked.run_state_output(fp, q, k, outs, state, m, save_every=1)
    if p.T < C:  # no chunk but the first: nothing reads it
        saved = dummy
    dy = dy.astype(p.dtype)
    dstate = dstate.astype(f32)
    opts = launch.launch_options()

    bv = _choose_bv(p)
    sb = _kernel("gdn_cuda_chunked_state_backward", STATE_BWD_INPUTS, STATE_BWD_OUTPUTS,
                 source_text("chunked/state_backward.cu"), header(), state_backward_smem(p.Dk, bv, exact))
    dU, dS, dS0 = sb(
        inputs=[q, k, W, Aqk, G, dy, m, dstate],
        template=[("Dk", p.Dk), ("Dv", p.Dv), ("BV", bv), ("EXACT", exact), ("MASKED", p.masked)],
        grid=(p.Dv // bv * chunked.THREADS, p.Hv, p.B),
        threadgroup=(chunked.THREADS, 1, 1),
        output_shapes=[(p.B, p.Hv, tp, p.Dv), (p.B, nt, p.Hv, p.Dv, p.Dk), (p.B, p.Hv, p.Dv, p.Dk)],
        output_dtypes=[f32, f32, f32],
        **opts,
    )
    cg = _kernel("gdn_cuda_chunked_chunk_grads", GRADS_INPUTS, GRADS_OUTPUTS, source_text("chunked/chunk_grads.cu"),
                 header(), chunk_grads_smem(p.Dk, p.Dv, exact))
    dq, dk, dv, dbeta, dl = cg(
        inputs=[q, k, v, beta, W, U, Aqk, G, state, saved, dS, dU, dy, m],
        template=[("Dk", p.Dk), ("Dv", p.Dv), ("EXACT", exact), ("MASKED", p.masked)],
        grid=(nt * chunked.THREADS, p.Hv, p.B),
        threadgroup=(chunked.THREADS, 1, 1),
        output_shapes=[(p.B, p.T, p.Hv, p.Dk), (p.B, p.T, p.Hv, p.Dk), (p.B, p.T, p.Hv, p.Dv), (p.B, p.T, p.Hv),
                       (p.B, p.T, p.Hv)],
        output_dtypes=[f32] * 5,
        **opts,
    )
    R = p.group
    if R > 1:  # a key head's gradient is the sum over its value heads
        dq = dq.reshape(p.B, p.T, p.Hk, R, p.Dk).sum(axis=3)
        dk = dk.reshape(p.B, p.T, p.Hk, R, p.Dk).sum(axis=3)
    dg = dl / gf
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype),
            dbeta.astype(beta.dtype), dS0)


def _trial(p: Problem, g_dtype, beta_dtype, mask_dtype) -> Optional[str]:
    """Run the launches of a call on `p` once, on small fresh inputs of the same kernel variants
    (template and argument types), and evaluate them: None, or what went wrong. Fresh inputs keep
    this legal inside mx.compile, where the call's own arrays cannot be evaluated."""
    tp = dataclasses.replace(p, T=chunked.CHUNK + 16)
    f32 = mx.float32
    q = mx.zeros((tp.B, tp.T, tp.Hk, tp.Dk), p.dtype)
    k = q
    v = mx.zeros((tp.B, tp.T, tp.Hv, tp.Dv), p.dtype)
    g = mx.ones((tp.B, tp.T, tp.Hv), g_dtype)
    beta = mx.zeros((tp.B, tp.T, tp.Hv), beta_dtype)
    state = mx.zeros((tp.B, tp.Hv, tp.Dv, tp.Dk), f32)
    mask = mx.ones((tp.B, tp.T), mask_dtype) if mask_dtype is not None else None
    try:
        mx.eval(*_run(tp, q, k, v, g, beta, state, mask, v, state))
        return None
    except Exception as e:  # noqa: BLE001  (any failure of the kernels means: take the ops backward)
        return f"{type(e).__name__}: {e}"


def chunked_vjp(p: Problem, q, k, v, g, beta, state, mask, dy, dstate):
    """(dq, dk, dv, dg, dbeta, dstate0) of the gated delta rule, as `ops.chunked_backward.chunked_vjp`
    (same shapes and dtypes), from the CUDA kernels. q, k [B,T,Hk,Dk]; v [B,T,Hv,Dv]; g, beta
    [B,T,Hv]; state [B,Hv,Dv,Dk] float32; mask [B,T] or None; dy [B,T,Hv,Dv]; dstate [B,Hv,Dv,Dk].
    The first call of a kernel variant tries it (`_trial`); one that fails sends this call and
    later ones to the ops backward, with a RuntimeWarning."""
    mdt = mask.dtype if mask is not None else None
    key = _shape_key(p) + (g.dtype, beta.dtype, mdt)
    if key not in _VERDICTS:
        _VERDICTS[key] = _trial(p, g.dtype, beta.dtype, mdt)
        if _VERDICTS[key] is not None:
            warnings.warn(f"CUDA chunked backward failed ({_VERDICTS[key][:500]}); the ops backward takes its calls",
                          RuntimeWarning, stacklevel=2)
    if _VERDICTS[key] is not None:
        return ops_backward.chunked_vjp(q, k, v, g, beta, state, mask, dy, dstate)
    return _run(p, q, k, v, g, beta, state, mask, dy, dstate)
