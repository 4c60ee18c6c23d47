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
    if backend == "auto":
        from .. import fallback

        args = (mod.name, B, K, Hk, Hv, Dk, Dv, qkv.dtype, mask is not None)
        vs = variants(*args)
        bad = fallback.tried(mod.name, vs, lambda: _probe(*args))
        if bad is not None:
            fallback.warn_once(mod.name, vs, f"fused decode-layer step, backend {mod.name!r}", bad,
                               "the unfused layer step")
            return None
    return mod.name


def variants(backend: str, B: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype, masked: bool):
    """The kernel variant (`fallback.Variant`, one) of the fused step on `backend` ("metal"/"cuda")."""
    from ..fallback import variant

    spec = decode_spec(B, K, Hk, Hv, Dk, Dv, dtype, masked)
    if backend == "metal":
        return (variant(spec.name, spec.template, spec.header(), spec.source()),)
    from ..cuda.kernel import recurrent_header

    return (variant(spec.name, spec.template, recurrent_header(spec), launch.compact(spec.source())),)


def random_step_inputs(B: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype, masked: bool, seed: int):
    """Seeded inputs of one fused step, in `decode_step`'s order (qkv, conv_state, w, a, b, A_log,
    dt_bias, state, mask): like a layer's, with a masked row when `masked` (B >= 2)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    C = 2 * Hk * Dk + Hv * Dv
    f = lambda *s, scale=1.0: mx.array((rng.standard_normal(s) * scale).astype(np.float32))  # noqa: E731
    mask = None
    if masked:
        m = np.ones((B, 1), bool)
        m[-1] = False
        mask = mx.array(m)
    return (f(B, 1, C).astype(dtype), f(B, K - 1, C).astype(dtype), f(C, K, 1, scale=0.5).astype(dtype),
            f(B, 1, Hv).astype(dtype), f(B, 1, Hv).astype(dtype),
            mx.array(np.log(rng.uniform(0.5, 16.0, Hv)).astype(np.float32)), f(Hv), f(B, Hv, Dv, Dk, scale=0.1),
            mask)


def check_step(backend: str, B: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype, masked: bool,
               seed: int = 0):
    """(y, conv state, state) relative errors of one fused step on `backend` against the float64
    reference (`reference.layer_step`), for seeded inputs; raises what the kernel raises."""
    from ..reference import layer_step, rel_error

    ins = random_step_inputs(B, K, Hk, Hv, Dk, Dv, dtype, masked, seed)
    outs = decode_step(backend, *ins, Hk, Hv, Dk, Dv)
    mx.eval(*outs)
    refs = layer_step(*ins, Hk, Dk, Dv)
    return tuple(rel_error(o, r) for o, r in zip(outs, refs))


def _probe(backend, B, K, Hk, Hv, Dk, Dv, dtype, masked):
    # The smallest batch with the same variant (B is not in the template): one row, two when masked.
    from ..fallback import failure_text
    from ..testing import tolerance

    try:
        errs = check_step(backend, 2 if masked else 1, K, Hk, Hv, Dk, Dv, dtype, masked)
    except Exception as exc:  # noqa: BLE001 -- any failure of the kernel is the verdict
        return failure_text(exc)
    tol = tolerance(dtype)
    if not all(e < tol for e in errs):  # NaN fails too
        return f"wrong result: relative errors y, conv state, state {', '.join(f'{e:.1e}' for e in errs)} (bound {tol:.0e})"
    return None


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
