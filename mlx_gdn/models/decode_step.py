"""Fused T=1 step of the drop-in layer: projections' outputs to y and both new states, one launch.

One body (kernels/decode_layer.metal) does the conv-state shift, depthwise conv, SiLU, split,
q/k normalisation, gating and the recurrence step; its norm variant (``norm=`` below) also applies
the layer's gated output norm, rms_norm(y) * weight * silu(z) per value head, so the layer goes
from this launch straight to out_proj. It runs through `mx.fast.metal_kernel` (Apple GPUs, or the
CPU inside `mlx_gdn.sim.simulated_metal()`) and, with the CUDA prelude, through
`mx.fast.cuda_kernel`. Without the norm, launch geometry is the recurrent decode kernel's
(`launch.recurrent_spec`: several threadgroups per head); with it, one threadgroup of at most
`NORM_THREADS` threads walks a whole head in passes, since the norm reduces over the head's Dv
outputs.

``norm`` arguments are a `Norm` (z [B, 1, Hv, Dv], weight [Dv], eps, sigmoid_dtype): the
`RMSNormGated` of the Qwen layers and its gate, rms_norm(y) * weight * silu(z); or, with
`sigmoid_dtype`, the Kimi and Bailing output norm, rms_norm(y) * weight * sigmoid(z), the sigmoid
rounded to `sigmoid_dtype` as each of those layers rounds it.

Gates: per head (a [B, 1, Hv], dt_bias [Hv]: the Qwen layers) or per key column (a [B, 1, Hv, Dk],
dt_bias [Hv] or [Hv, Dk]: Kimi Linear, Kimi K3, Bailing), A_log [Hv] (or [Hv, 1]) either way, with
the fused options ``lower_bound`` and ``allow_neg_eigval`` of `mlx_gdn.gated_delta_update`; the
body takes the formulas from kernels/gates.h. `Gating` names a variant's choice.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx

from .. import backends, launch
from ..validate import Problem

BODY = "decode_layer.metal"
INPUT_NAMES = ("qkv", "conv_state", "w", "a", "b", "A_log", "dt_bias", "state_in")  # then "mask" if masked
NORM_INPUT_NAMES = ("z", "norm_weight")  # after INPUT_NAMES, before "mask", in the norm variant
OUTPUT_NAMES = ("y", "conv_out", "state_out")
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
# Threads of a norm-variant threadgroup: few enough that any register count ptxas picks still
# launches (256 * 255 registers fit an SM), many enough that a 128-row head takes 4 passes.
NORM_THREADS = 256


class Gating(NamedTuple):
    """The gate variant: per key column (`key`; a [B, 1, Hv, Dk]), dt_bias per key column
    (`dt_key`; [Hv, Dk]), `lower_bound` (a float <= 0, or None), `neg` (allow_neg_eigval)."""

    key: bool = False
    dt_key: bool = False
    lower_bound: Optional[float] = None
    neg: bool = False


SCALAR = Gating()  # the Qwen layers' gates


def gating_of(a: mx.array, dt_bias: Optional[mx.array], Hv: int, Dk: int, lower_bound=None,
              allow_neg_eigval=False) -> Optional[Gating]:
    """The `Gating` of a step with these gate inputs, or None where the fused step does not take
    them (the unfused path then raises its usual errors). a [B, 1, Hv] or [B, 1, Hv, Dk];
    dt_bias [Hv] (any shape of Hv elements) or, with a per-key a, Hv * Dk elements; None: [Hv]."""
    key = a.ndim == 4
    n = Hv if dt_bias is None else dt_bias.size
    if n != Hv and not (key and n == Hv * Dk):
        return None
    if lower_bound is not None:
        # the checks of validate.check_update, answered with None instead of an error
        if (isinstance(lower_bound, bool) or not isinstance(lower_bound, numbers.Real)
                or not math.isfinite(lower_bound) or lower_bound > 0):
            return None
        lower_bound = float(lower_bound)
    if not isinstance(allow_neg_eigval, bool):
        return None
    return Gating(key, key and n != Hv, lower_bound, allow_neg_eigval)


class Norm(NamedTuple):
    """The output norm the norm variant applies: z [B, 1, Hv, Dv] (the gate), weight [Dv], eps;
    sigmoid_dtype None: times silu(z) in float32, rounded to y's dtype (`RMSNormGated`); a dtype:
    times sigmoid(z) rounded to it, the product rounded to result_type(rms_norm dtype, it)."""

    z: mx.array
    weight: mx.array
    eps: float
    sigmoid_dtype: Optional[mx.Dtype] = None


def _norm_rows(Dv: int, L: int) -> Tuple[int, int]:
    # (rows per pass R, passes P) of the norm variant: R * L fills whole simdgroups and at most
    # NORM_THREADS threads; R * P >= Dv.
    unit = 32 // L
    R = min(max(unit, NORM_THREADS // L), -(-Dv // unit) * unit)
    return R, -(-Dv // R)


@lru_cache(maxsize=None)
def decode_spec(B: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype, masked: bool,
                norm_dtype: Optional[mx.Dtype] = None, eps: float = 0.0, gating: Gating = SCALAR,
                sigmoid_dtype: Optional[mx.Dtype] = None) -> launch.LaunchSpec:
    """Launch spec of the fused step; dtype is qkv's (and the conv state's, and y's but for a
    sigmoid-gated norm). With `norm_dtype` (the dtype mx.fast.rms_norm of y and the norm weight
    returns) the norm variant, with rms_norm's `eps` and `sigmoid_dtype` as in `Norm`; `gating`
    the gate variant."""
    p = Problem(B, 1, Hk, Hv, Dk, Dv, dtype, "key" if gating.key else "scalar", masked, True)
    base = launch.recurrent_spec(p, path="decode")
    tmpl = dict(base.template)
    L = tmpl["L"]
    norm = norm_dtype is not None
    names = INPUT_NAMES + (NORM_INPUT_NAMES if norm else ()) + (("mask",) if masked else ())
    C = 2 * Hk * Dk + Hv * Dv
    y_dtype = dtype
    if norm:
        R, P = _norm_rows(Dv, L)
        grid, threadgroup = (R * L, 1, B * Hv), (R * L, 1, 1)
        extra = (("NormT", norm_dtype),)
        defines = (("GDN_MASKED", int(masked)), ("GDN_NORM", 1), ("GDN_NORM_EPS", float(eps)),
                   ("GDN_NORM_SIGMOID", int(sigmoid_dtype is not None)))
        if sigmoid_dtype is not None:
            y_dtype = mx.result_type(norm_dtype, sigmoid_dtype)
            extra += (("GateT", sigmoid_dtype), ("OutT", y_dtype))
    else:
        R, P = tmpl["R"], 1
        grid, threadgroup = base.grid, base.threadgroup
        extra = ()
        defines = (("GDN_MASKED", int(masked)), ("GDN_NORM", 0))
    lower = gating.lower_bound is not None
    defines += (("GDN_DT_KEY", int(gating.dt_key)),)
    if lower:
        defines += (("GDN_LOWER_BOUND", float(gating.lower_bound)),)
    suffix = ("_key" if gating.key else "") + ("_dtkey" if gating.dt_key else "") + ("_lower" if lower else "")
    suffix += "_neg" if gating.neg else ""
    return launch.LaunchSpec(
        name="gdn_decode_layer" + suffix + ("_norm" if norm else "") + ("_sigmoid" if norm and sigmoid_dtype else "")
        + ("_masked" if masked else ""),
        body=BODY,
        headers=(launch.GATES_HEADER, "layer_math.h"),
        defines=defines,
        input_names=names,
        output_names=OUTPUT_NAMES,
        template=(("InT", dtype), ("Dk", Dk), ("Dv", Dv), ("Hk", Hk), ("Hv", Hv), ("K", K),
                  ("L", L), ("R", R), ("P", P), ("KEYGATE", gating.key), ("LOWER", lower),
                  ("NEG", gating.neg)) + extra,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=((B, 1, Hv, Dv), (B, K - 1, C), (B, Hv, Dv, Dk)),
        output_dtypes=(y_dtype, dtype, mx.float32),
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


def fused_backend(backend: str, qkv, conv_state, w, a, b, state, mask, Hk: int, Hv: int, Dk: int, Dv: int,
                  norm: Optional[Norm] = None, A_log: Optional[mx.array] = None, dt_bias: Optional[mx.array] = None,
                  lower_bound: Optional[float] = None, allow_neg_eigval: bool = False) -> Optional[str]:
    """"metal" or "cuda" when the fused step (with `norm`: its norm variant) takes this call, else
    None (the caller's unfused path then runs, and raises its usual errors for bad input or an
    unavailable backend).

    qkv [B, 1, C]; conv_state [B, K-1, C] in qkv's dtype; w [C, K, 1]; a [B, 1, Hv] or (per-key
    gates) [B, 1, Hv, Dk]; b [B, 1, Hv]; state [B, Hv, Dv, Dk] float32 or None; mask [B, 1] bool or
    None; norm: `Norm` or None; A_log (Hv elements) and dt_bias (Hv, or Hv * Dk with per-key a)
    as `decode_step` will get them, or None for the per-head [Hv] arrays; lower_bound, allow_neg_eigval
    as in `mlx_gdn.gated_delta_update`.
    """
    # The answer depends only on what is read here (shapes, dtypes, sizes, options, backend): a
    # decode loop asks the same question for every layer at every step.
    key = ("decode_layer", backend, qkv.shape, qkv.dtype, conv_state.shape, conv_state.dtype, w.shape, a.shape,
           b.shape, None if state is None else (state.shape, state.dtype),
           None if mask is None else (mask.shape, mask.dtype), Hk, Hv, Dk, Dv,
           None if norm is None else (norm.z.shape, norm.z.dtype, norm.weight.shape, norm.weight.dtype, norm.eps,
                                      norm.sigmoid_dtype),
           None if A_log is None else (A_log.shape, A_log.dtype),
           None if dt_bias is None else (dt_bias.shape, dt_bias.dtype),
           type(lower_bound), lower_bound, type(allow_neg_eigval), allow_neg_eigval)
    return backends.remembered(key, _fused_backend, backend, qkv, conv_state, w, a, b, state, mask, Hk, Hv, Dk, Dv,
                               norm, A_log, dt_bias, lower_bound, allow_neg_eigval)


def norm_dtype(y_dtype: mx.Dtype, weight_dtype: mx.Dtype) -> mx.Dtype:
    """The dtype mx.fast.rms_norm returns for y and weight of these dtypes (the norm rounds to it)."""
    return mx.result_type(y_dtype, weight_dtype)


def _norm_takes(norm: Norm, B: int, Hv: int, Dv: int) -> bool:
    z, weight, eps, sigmoid_dtype = norm
    return (z.shape == (B, 1, Hv, Dv) and z.dtype in _FLOATS and weight.shape == (Dv,) and weight.dtype in _FLOATS
            and isinstance(eps, (int, float)) and eps >= 0 and (sigmoid_dtype is None or sigmoid_dtype in _FLOATS))


def conv_layout_fits(qkv, conv_state, w, Hk: int, Hv: int, Dk: int, Dv: int) -> bool:
    """Whether qkv [B, S, C] (C = 2 Hk Dk + Hv Dv, a float dtype), conv_state [B, K-1, C] in qkv's
    dtype and w [C, K, 1] (K >= 2) have the single-convolution layout the fused layer bodies read."""
    if qkv.ndim != 3 or qkv.dtype not in _FLOATS:
        return False
    B, _, C = qkv.shape
    if C != 2 * Hk * Dk + Hv * Dv or w.ndim != 3 or w.shape[0] != C or w.shape[2] != 1 or w.shape[1] < 2:
        return False
    return conv_state.shape == (B, w.shape[1] - 1, C) and conv_state.dtype == qkv.dtype


def _fused_backend(backend, qkv, conv_state, w, a, b, state, mask, Hk, Hv, Dk, Dv, norm, A_log, dt_bias, lower_bound,
                   allow_neg_eigval) -> Optional[str]:
    if qkv.ndim != 3 or qkv.shape[1] != 1 or not conv_layout_fits(qkv, conv_state, w, Hk, Hv, Dk, Dv):
        return None
    B, K = qkv.shape[0], w.shape[1]
    if a.shape not in ((B, 1, Hv), (B, 1, Hv, Dk)) or b.shape != (B, 1, Hv):
        return None
    if A_log is not None and (A_log.size != Hv or A_log.dtype not in _FLOATS):
        return None
    if dt_bias is not None and dt_bias.dtype not in _FLOATS:
        return None
    gating = gating_of(a, dt_bias, Hv, Dk, lower_bound, allow_neg_eigval)
    if gating is None:
        return None
    if state is not None and (state.shape != (B, Hv, Dv, Dk) or state.dtype != mx.float32):
        return None
    if mask is not None and (mask.shape != (B, 1) or mask.dtype != mx.bool_):
        return None
    if norm is not None and not _norm_takes(norm, B, Hv, Dv):
        return None
    p = Problem(B, 1, Hk, Hv, Dk, Dv, qkv.dtype, "key" if gating.key else "scalar", mask is not None, True)
    try:
        mod, _ = backends.resolve(backend, "recurrent", p)
    except ValueError:
        return None
    if mod.name not in ("metal", "cuda") or not launch.supports_recurrent(p):
        return None
    if backend == "auto":
        from .. import fallback

        nd = None if norm is None else norm_dtype(qkv.dtype, norm.weight.dtype)
        eps = 0.0 if norm is None else float(norm.eps)
        sd = None if norm is None else norm.sigmoid_dtype
        args = (mod.name, B, K, Hk, Hv, Dk, Dv, qkv.dtype, mask is not None, nd, eps, gating, sd)
        vs = variants(*args)
        bad = fallback.tried(mod.name, vs, lambda: _probe(*args))
        if bad is not None:
            what = "fused decode-layer step" + (" with the output norm" if norm is not None else "")
            instead = "the unfused layer step" if norm is None else "the fused step without the norm, or the unfused step,"
            fallback.warn_once(mod.name, vs, f"{what}, backend {mod.name!r}", bad, instead)
            return None
    return mod.name


def variants(backend: str, B: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype, masked: bool,
             norm_dtype: Optional[mx.Dtype] = None, eps: float = 0.0, gating: Gating = SCALAR,
             sigmoid_dtype: Optional[mx.Dtype] = None):
    """The kernel variant (`fallback.Variant`, one) of the fused step on `backend` ("metal"/"cuda");
    `norm_dtype`, `eps`, `gating` and `sigmoid_dtype` as in `decode_spec`."""
    from ..fallback import variant

    spec = decode_spec(B, K, Hk, Hv, Dk, Dv, dtype, masked, norm_dtype, eps, gating, sigmoid_dtype)
    if backend == "metal":
        return (variant(spec.name, spec.template, spec.header(), spec.source()),)
    from ..cuda.kernel import recurrent_header

    return (variant(spec.name, spec.template, recurrent_header(spec), launch.compact(spec.source())),)


def random_step_inputs(B: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype, masked: bool, seed: int,
                       gating: Gating = SCALAR):
    """Seeded inputs of one fused step, in `decode_step`'s order (qkv, conv_state, w, a, b, A_log,
    dt_bias, state, mask): like a layer's, with a masked row when `masked` (B >= 2); a and dt_bias
    shaped for `gating` (a [B, 1, Hv, Dk] per key, dt_bias [Hv, Dk] per key column)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    C = 2 * Hk * Dk + Hv * Dv
    f = lambda *s, scale=1.0: mx.array((rng.standard_normal(s) * scale).astype(np.float32))  # noqa: E731
    mask = None
    if masked:
        m = np.ones((B, 1), bool)
        m[-1] = False
        mask = mx.array(m)
    a_shape = (B, 1, Hv, Dk) if gating.key else (B, 1, Hv)
    return (f(B, 1, C).astype(dtype), f(B, K - 1, C).astype(dtype), f(C, K, 1, scale=0.5).astype(dtype),
            f(*a_shape).astype(dtype), f(B, 1, Hv).astype(dtype),
            mx.array(np.log(rng.uniform(0.5, 16.0, Hv)).astype(np.float32)),
            f(Hv, Dk) if gating.dt_key else f(Hv), f(B, Hv, Dv, Dk, scale=0.1), mask)


def random_norm(B: int, Hv: int, Dv: int, dtype: mx.Dtype, weight_dtype: mx.Dtype, eps: float, seed: int,
                sigmoid_dtype: Optional[mx.Dtype] = None) -> Norm:
    """A seeded `Norm`: z [B, 1, Hv, Dv] in `dtype` (a projection's output), weight [Dv] near 1,
    `sigmoid_dtype` as in `Norm`."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    z = mx.array(rng.standard_normal((B, 1, Hv, Dv)).astype(np.float32)).astype(dtype)
    weight = mx.array((1.0 + 0.3 * rng.standard_normal(Dv)).astype(np.float32)).astype(weight_dtype)
    return Norm(z, weight, eps, sigmoid_dtype)


def check_step(backend: str, B: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype, masked: bool,
               seed: int = 0, norm_dtype: Optional[mx.Dtype] = None, eps: float = 0.0, gating: Gating = SCALAR,
               sigmoid_dtype: Optional[mx.Dtype] = None):
    """(y, conv state, state) relative errors of one fused step on `backend` against the float64
    reference (`reference.layer_step`), for seeded inputs; raises what the kernel raises. With
    `norm_dtype`, the norm variant (its weight in `norm_dtype`, which is then the rms_norm dtype;
    `sigmoid_dtype` as in `Norm`); `gating` the gate variant."""
    from ..reference import layer_step, rel_error

    ins = random_step_inputs(B, K, Hk, Hv, Dk, Dv, dtype, masked, seed, gating)
    norm = None if norm_dtype is None else random_norm(B, Hv, Dv, dtype, norm_dtype, eps, seed, sigmoid_dtype)
    opts = dict(lower_bound=gating.lower_bound, allow_neg_eigval=gating.neg)
    outs = decode_step(backend, *ins, Hk, Hv, Dk, Dv, norm=norm, **opts)
    mx.eval(*outs)
    refs = layer_step(*ins, Hk, Dk, Dv, norm=norm, **opts)
    return tuple(rel_error(o, r) for o, r in zip(outs, refs))


def _probe(backend, B, K, Hk, Hv, Dk, Dv, dtype, masked, norm_dtype, eps, gating, sigmoid_dtype):
    # The smallest batch with the same variant (B is not in the template): one row, two when masked.
    # The norm's weight is drawn in the rms_norm dtype: the variant depends on that dtype only.
    from ..fallback import failure_text
    from ..testing import tolerance

    try:
        errs = check_step(backend, 2 if masked else 1, K, Hk, Hv, Dk, Dv, dtype, masked, norm_dtype=norm_dtype,
                          eps=eps, gating=gating, sigmoid_dtype=sigmoid_dtype)
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
def _launcher(backend: str, B: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype, masked: bool,
              norm_dtype: Optional[mx.Dtype], eps: float, gating: Gating, sigmoid_dtype: Optional[mx.Dtype]):
    # (kernel object, call keyword arguments): a pure function of its arguments
    spec = decode_spec(B, K, Hk, Hv, Dk, Dv, dtype, masked, norm_dtype, eps, gating, sigmoid_dtype)
    return _kernel(backend, spec), spec.call_kwargs()


def decode_step(backend: str, qkv, conv_state, w, a, b, A_log, dt_bias, state, mask,
                Hk: int, Hv: int, Dk: int, Dv: int, norm: Optional[Norm] = None, lower_bound: Optional[float] = None,
                allow_neg_eigval: bool = False) -> Tuple[mx.array, mx.array, mx.array]:
    """(y [B,1,Hv,Dv] in qkv's dtype, new conv state [B,K-1,C] in qkv's dtype, new state [B,Hv,Dv,Dk]
    float32) from one launch; backend "metal" or "cuda", inputs as accepted by `fused_backend`
    (a [B,1,Hv] or [B,1,Hv,Dk]; A_log Hv elements; dt_bias Hv, or Hv * Dk with per-key a).
    With `norm`, y is the normed output rms_norm(y) * weight * silu(z), in qkv's dtype, or with
    norm.sigmoid_dtype rms_norm(y) * weight * sigmoid(z), in the dtype `Norm` says."""
    B = qkv.shape[0]
    gating = gating_of(a, dt_bias, Hv, Dk, lower_bound, allow_neg_eigval)
    if gating is None:
        raise ValueError(f"decode_step: gates a {a.shape}, dt_bias {dt_bias.shape}, lower_bound {lower_bound!r}, "
                         f"allow_neg_eigval {allow_neg_eigval!r} are not a fused step's (see fused_backend)")
    if norm is None:
        kern, kw = _launcher(backend, B, w.shape[1], Hk, Hv, Dk, Dv, qkv.dtype, mask is not None, None, 0.0, gating,
                             None)
    else:
        kern, kw = _launcher(backend, B, w.shape[1], Hk, Hv, Dk, Dv, qkv.dtype, mask is not None,
                             norm_dtype(qkv.dtype, norm.weight.dtype), float(norm.eps), gating, norm.sigmoid_dtype)
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    ins = [qkv, conv_state, w, a, b, A_log, dt_bias, state]  # INPUT_NAMES' order
    if norm is not None:
        ins += [norm.z, norm.weight]
    if mask is not None:
        ins.append(mask)
    y, conv_out, new_state = kern(inputs=ins, **kw, **launch.launch_options())
    return y, conv_out, new_state
