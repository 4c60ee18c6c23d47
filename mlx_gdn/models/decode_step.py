"""Fused T=1 step of the drop-in layer: projections' outputs to y and both new states, one launch.

One body (kernels/decode_layer.metal) does the conv-state shift, depthwise conv, SiLU, split,
q/k normalisation, gating and the recurrence step. It runs through `mx.fast.metal_kernel` (Apple
GPUs, or the CPU inside `mlx_gdn.sim.simulated_metal()`) and, with the CUDA prelude, through
`mx.fast.cuda_kernel`. Launch geometry is the recurrent decode kernel's (`launch.recurrent_spec`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import mlx.core as mx

from .. import backends, launch
from ..validate import Problem

BODY = "decode_layer.metal"
INPUT_NAMES = ("qkv", "conv_state", "w", "a", "b", "A_log", "dt_bias", "state_in")  # then "mask" if masked
OUTPUT_NAMES = ("y", "conv_out", "state_out")
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


@lru_cache(maxsize=None)
def decode_spec(B: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype, masked: bool) -> launch.LaunchSpec:
    """Launch spec of the fused step; dtype is qkv's (and y's, and the conv state's)."""
    p = Problem(B, 1, Hk, Hv, Dk, Dv, dtype, "scalar", masked, True)
    base = launch.recurrent_spec(p, path="decode")
    tmpl = dict(base.template)
    names = INPUT_NAMES + (("mask",) if masked else ())
    C = 2 * Hk * Dk + Hv * Dv
    return launch.LaunchSpec(
        name="gdn_decode_layer" + ("_masked" if masked else ""),
        body=BODY,
        headers=(launch.GATES_HEADER,),
        defines=(("GDN_MASKED", int(masked)),),
        input_names=names,
        output_names=OUTPUT_NAMES,
        template=(("InT", dtype), ("Dk", Dk), ("Dv", Dv), ("Hk", Hk), ("Hv", Hv), ("K", K),
                  ("L", tmpl["L"]), ("R", tmpl["R"])),
        grid=base.grid,
        threadgroup=base.threadgroup,
        output_shapes=((B, 1, Hv, Dv), (B, K - 1, C), (B, Hv, Dv, Dk)),
        output_dtypes=(dtype, dtype, mx.float32),
        # The body indexes every input as a row-contiguous array (qkv, conv state, the cache
        # arrays it wrote itself and the projections' outputs already are: no copy then).
        ensure_row_contiguous=True,
    )


def _kernel(backend: str, spec: launch.LaunchSpec):
    if backend == "metal":
        from ..metal.kernel import kernel

        return kernel(spec)
    from ..cuda.kernel import kernel_for_spec

    return kernel_for_spec(spec)


def fused_backend(backend: str, qkv, conv_state, w, a, b, state, mask, Hk: int, Hv: int, Dk: int, Dv: int) -> Optional[str]:
    """"metal" or "cuda" when the fused step takes this call, else None (the caller's unfused path
    then runs, and raises its usual errors for bad input or an unavailable backend).

    qkv [B, 1, C]; conv_state [B, K-1, C] in qkv's dtype; w [C, K, 1]; a, b [B, 1, Hv];
    state [B, Hv, Dv, Dk] float32 or None; mask [B, 1] bool or None.
    """
    # The answer depends only on what is read here (shapes, dtypes, sizes, backend): a decode
    # loop asks the same question for every layer at every step.
    key = ("decode_layer", backend, qkv.shape, qkv.dtype, conv_state.shape, conv_state.dtype, w.shape, a.shape,
           b.shape, None if state is None else (state.shape, state.dtype),
           None if mask is None else (mask.shape, mask.dtype), Hk, Hv, Dk, Dv)
    return backends.remembered(key, _fused_backend, backend, qkv, conv_state, w, a, b, state, mask, Hk, Hv, Dk, Dv)


def _fused_backend(backend, qkv, conv_state, w, a, b, state, mask, Hk, Hv, Dk, Dv) -> Optional[str]:
    if qkv.ndim != 3 or qkv.shape[1] != 1 or qkv.dtype not in _FLOATS:
        return None
    B, _, C = qkv.shape
    if C != 2 * Hk * Dk + Hv * Dv or w.ndim != 3 or w.shape[0] != C or w.shape[2] != 1 or w.shape[1] < 2:
        return None
    K = w.shape[1]
    if conv_state.shape != (B, K - 1, C) or conv_state.dtype != qkv.dtype:
        return None
    if a.shape != (B, 1, Hv) or b.shape != (B, 1, Hv):
        return None
    if state is not None and (state.shape != (B, Hv, Dv, Dk) or state.dtype != mx.float32):
        return None
    if mask is not None and (mask.shape != (B, 1) or mask.dtype != mx.bool_):
        return None
    p = Problem(B, 1, Hk, Hv, Dk, Dv, qkv.dtype, "scalar", mask is not None, True)
    try:
        mod, _ = backends.resolve(backend, "recurrent", p)
    except ValueError:
        return None
    if mod.name not in ("metal", "cuda") or not launch.supports_recurrent(p):
        return None
    return mod.name


@backends.on_clear
def _clear_launchers():
    _launcher.cache_clear()


@lru_cache(maxsize=256)
def _launcher(backend: str, B: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype, masked: bool):
    # (kernel object, call keyword arguments): a pure function of its arguments
    spec = decode_spec(B, K, Hk, Hv, Dk, Dv, dtype, masked)
    return _kernel(backend, spec), spec.call_kwargs()


def decode_step(backend: str, qkv, conv_state, w, a, b, A_log, dt_bias, state, mask,
                Hk: int, Hv: int, Dk: int, Dv: int) -> Tuple[mx.array, mx.array, mx.array]:
    """(y [B,1,Hv,Dv] in qkv's dtype, new conv state [B,K-1,C] in qkv's dtype, new state [B,Hv,Dv,Dk]
    float32) from one launch; backend "metal" or "cuda", inputs as accepted by `fused_backend`."""
    B = qkv.shape[0]
    kern, kw = _launcher(backend, B, w.shape[1], Hk, Hv, Dk, Dv, qkv.dtype, mask is not None)
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    ins = [qkv, conv_state, w, a, b, A_log, dt_bias, state]  # INPUT_NAMES' order
    if mask is not None:
        ins.append(mask)
    y, conv_out, new_state = kern(inputs=ins, **kw, **launch.launch_options())
    return y, conv_out, new_state
