"""The chunked form as two Metal kernels (simdgroup 8x8 matrix products), for long prompts.

kernels/chunked/kkt_solve_wy.metal (stages kkt_solve and wy) computes every chunk's
state-independent operands in parallel (one threadgroup per chunk and head);
kernels/chunked/state_output.metal (stages state and output) then carries the state through the
chunks in order (one threadgroup per head and tile of state rows). The math and the stage names
are those of `ops.chunked` and the CUDA kernels.
"""

from __future__ import annotations

import mlx.core as mx

from ..launch import GATES_HEADER, LaunchSpec, fused_options, lower_bound_array
from ..validate import Problem
from .kernel import kernel

# Steps per chunk. 32, not the CUDA kernels' 64, because threadgroup memory forces it: stage
# kkt_solve keeps six C x C float32 matrices (A, P, the two solves, their products with P) in it,
# 24 KiB at C = 32 and 96 KiB at C = 64, past the 32 KiB a Metal threadgroup may use.
CHUNK = 32
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
    """Scalar or per-key gates, Dk and Dv multiples of 8 with Dk <= 512."""
    if p.Dk % 8 or p.Dv % 8 or not _rows_per_tile(p.Dk, p.Dv):
        return False
    N = -(-p.T // CHUNK)
    sizes = (p.B * N * CHUNK * max(p.Hk * p.Dk, p.Hv * p.Dv), p.B * p.Hv * N * 2 * CHUNK * max(p.Dk, p.Dv))
    if p.gate == "key":  # g or a [B, T, Hv, Dk]
        sizes += (p.B * N * CHUNK * p.Hv * p.Dk,)
    return max(sizes) <= _INT32_MAX and p.B <= 65535 and p.Hv <= 65535


def _specs(p: Problem, N: int, *, lower: bool = False, neg: bool = False, dt_key: bool = False, save_every: int = 0):
    C, RV = CHUNK, _rows_per_tile(p.Dk, p.Dv)
    key = p.gate == "key"
    f32 = mx.float32
    gate_names = ("a", "b", "A_log", "dt_bias", "lower_bound") if p.fused else ("g", "beta")
    variant = ("update" if p.fused else "rule") + ("_key" if key else "") + ("_dtkey" if dt_key else "")
    variant += "_masked" if p.masked else ""
    kkt_wy = LaunchSpec(
        name=f"gdn_chunked_kkt_solve_wy_{variant}",
        body="chunked/kkt_solve_wy.metal",
        headers=(GATES_HEADER,),
        defines=(("GDN_FUSED", int(p.fused)), ("GDN_MASKED", int(p.masked)), ("GDN_DT_KEY", int(dt_key))),
        input_names=("q", "k", "v") + gate_names + (("mask",) if p.masked else ()),
        output_names=("wq", "uy", "kd", "gc"),
        template=(
            ("InT", p.dtype), ("C", C), ("Dk", p.Dk), ("Dv", p.Dv), ("Hk", p.Hk), ("Hv", p.Hv), ("NSG", NSG),
            ("LOWER", bool(p.fused and lower)), ("NEG", bool(p.fused and neg)), ("KEYGATE", key),
        ),
        grid=(32 * NSG * N, p.Hv, p.B),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=(
            (p.B, p.Hv, N, 2 * C, p.Dk),
            (p.B, p.Hv, N, 2 * C, p.Dv),
            (p.B, p.Hv, N, C, p.Dk),
            (p.B, p.Hv, N, p.Dk) if key else (p.B, p.Hv, N),
        ),
        output_dtypes=(f32, f32, f32, f32),
        ensure_row_contiguous=True,  # the bodies index rows directly
    )
    # save_every: the states after every save_every-th chunk as a third output (return_states=C).
    saved = p.T // (save_every * C) if save_every else 0
    state = LaunchSpec(
        name="gdn_chunked_state_output" + ("_key" if key else "") + ("_save" if save_every else ""),
        body="chunked/state_output.metal",
        headers=(),
        defines=(("GDN_SAVE", 1),) if save_every else (),
        input_names=("wq", "uy", "kd", "gc", "state_in", "steps"),
        output_names=("y", "state_out") + (("states",) if save_every else ()),
        template=(("InT", p.dtype), ("C", C), ("Dk", p.Dk), ("Dv", p.Dv), ("Hv", p.Hv), ("RV", RV), ("NSG", NSG),
                  ("KEYGATE", key)) + ((("SAVE_EVERY", save_every),) if save_every else ()),
        grid=(32 * NSG * (p.Dv // RV), p.Hv, p.B),
        threadgroup=(32 * NSG, 1, 1),
        output_shapes=((p.B, p.T, p.Hv, p.Dv), (p.B, p.Hv, p.Dv, p.Dk))
        + (((p.B, saved, p.Hv, p.Dv, p.Dk),) if save_every else ()),
        output_dtypes=(p.dtype, f32) + ((f32,) if save_every else ()),
        ensure_row_contiguous=True,
    )
    return kkt_wy, state


def launch_specs(p: Problem, *, lower: bool = False, neg: bool = False, dt_key: bool = False):
    """(prep, state) launch specs of a call on `p`; lower, neg: the fused options."""
    return _specs(p, -(-p.T // CHUNK), lower=lower, neg=neg, dt_key=dt_key)


def _launch(spec: LaunchSpec, arrays):
    return spec.launch(kernel(spec), arrays)


def saves_states(p: Problem, every: int) -> bool:
    """Whether run_chunked can return the states after every `every` tokens (return_states=every):
    `every` a multiple of CHUNK, within the kernels' index range."""
    return every > 0 and every % CHUNK == 0 and p.B * (p.T // every) * p.Hv * p.Dv * p.Dk <= _INT32_MAX


def run_chunked(p: Problem, q, k, v, state, mask, *, g=None, beta=None, gating=None, save_every: int = 0):
    """(y [B,T,Hv,Dv] in p.dtype, state [B,Hv,Dv,Dk] float32) for validated inputs: two launches.
    save_every E > 0 adds states [B, T // (E * CHUNK), Hv, Dv, Dk] float32, the states after
    tokens E*CHUNK, 2E*CHUNK, ... (return_states=E*CHUNK; `saves_states`).

    q, k: [B,T,Hk,Dk]; v: [B,T,Hv,Dv]; g: [B,T,Hv] or [B,T,Hv,Dk], beta: [B,T,Hv] (or `gating`,
    a FusedGating, whose gates the first kernel computes; a [B,T,Hv] or [B,T,Hv,Dk]); state: [B,Hv,Dv,Dk] float32; mask: [B,T] bool/int or None.
    The kernels read the inputs as they come (any float dtype); the last chunk's tail and masked
    steps are identity steps inside the first kernel.
    """
    N = -(-p.T // CHUNK)
    lower, neg, dt_key = fused_options(gating)
    kkt_wy, st = _specs(p, N, lower=lower, neg=neg, dt_key=dt_key, save_every=save_every)
    arrays = {"q": q, "k": k, "v": v}
    if gating is not None:
        arrays.update(a=gating.a, b=gating.b, A_log=gating.A_log, dt_bias=gating.dt_bias,
                      lower_bound=lower_bound_array(gating.lower_bound))
        steps = gating.b
    else:
        arrays.update(g=g, beta=beta)
        steps = beta
    if mask is not None:
        arrays["mask"] = mask
    wq, uy, kd, gc = _launch(kkt_wy, arrays)
    return tuple(_launch(st, {"wq": wq, "uy": uy, "kd": kd, "gc": gc, "state_in": state, "steps": steps}))
