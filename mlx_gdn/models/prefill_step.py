"""Fused prefill pieces of the drop-in layer (T > 1, inference): two launches in place of the ops
around the recurrence.

- prep (kernels/prefill_prep.metal): the conv over the conv state and the new inputs, SiLU, split
  and q/k normalisation, giving row-contiguous q, k, v; in place of `layers.causal_conv`, the split
  and `gating.normalize_qk` (a conv, a concatenation, the SiLU, two rms_norms, a scale and the
  copies that make q, k, v contiguous for the recurrence kernels).
- gated norm (kernels/gated_norm.metal): rms_norm(y) * weight * silu(z) per value head and token; in
  place of `layers.RMSNormGated` (an rms_norm and the float32 gate).

Both bodies are the Metal vocabulary, run through `mx.fast.metal_kernel` and, with the CUDA
prelude, `mx.fast.cuda_kernel`; their element math is kernels/layer_math.h, which the fused T=1
step (`decode_step`) shares. Under backend "auto", each variant is tried once against the float64
reference (`reference.layer_prep`, `reference.gated_rms_norm`); one that fails warns once and the
unfused path runs instead. Kernel launches have no VJP: the layer takes these only outside
training, and gives them the unfused computation's VJP (`layers._with_plain_vjp`), so a gradient
through a layer in eval mode still flows.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import mlx.core as mx

from .. import backends, launch
from ..validate import Problem
from .decode_step import conv_layout_fits

PREP_BODY = "prefill_prep.metal"
NORM_BODY = "gated_norm.metal"
HEADERS = (launch.GATES_HEADER, "layer_math.h")
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
NORM_ROWS = 4  # rows (simdgroups) per threadgroup of the gated norm
_GRID_YZ = 65535  # CUDA's limit on grid y and z (tokens and batch rows of the prep launch)


def _threads(D: int) -> int:
    # Threads of a prep threadgroup: one per channel of the widest head, whole simdgroups, <= 256.
    return min(-(-D // 32) * 32, 256)


@lru_cache(maxsize=None)
def prep_spec(B: int, S: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype,
              masked: bool) -> launch.LaunchSpec:
    """Launch spec of the prep launch; dtype is qkv's (and q's, k's, v's)."""
    nt = _threads(max(Dk, Dv))
    return launch.LaunchSpec(
        name="gdn_prefill_prep" + ("_masked" if masked else ""),
        body=PREP_BODY,
        headers=HEADERS,
        defines=(("GDN_MASKED", int(masked)),),
        input_names=("qkv", "conv_state", "w") + (("mask",) if masked else ()),
        output_names=("q", "k", "v"),
        template=(("InT", dtype), ("Dk", Dk), ("Dv", Dv), ("Hk", Hk), ("Hv", Hv), ("K", K), ("NT", nt)),
        grid=(nt * (2 * Hk + Hv), S, B),
        threadgroup=(nt, 1, 1),
        output_shapes=((B, S, Hk, Dk), (B, S, Hk, Dk), (B, S, Hv, Dv)),
        output_dtypes=(dtype, dtype, dtype),
        ensure_row_contiguous=True,
    )


@lru_cache(maxsize=None)
def norm_spec(N: int, Dv: int, dtype: mx.Dtype, z_dtype: mx.Dtype, norm_dtype: mx.Dtype,
              eps: float) -> launch.LaunchSpec:
    """Launch spec of the gated norm over N rows of Dv; dtype is y's (and the output's)."""
    groups = -(-N // NORM_ROWS)
    return launch.LaunchSpec(
        name="gdn_gated_norm",
        body=NORM_BODY,
        headers=HEADERS,
        defines=(("GDN_NORM_EPS", float(eps)),),
        input_names=("y", "z", "weight"),
        output_names=("out",),
        template=(("InT", dtype), ("ZT", z_dtype), ("NormT", norm_dtype), ("Dv", Dv), ("RPT", NORM_ROWS)),
        grid=(32 * NORM_ROWS * groups, 1, 1),
        threadgroup=(32 * NORM_ROWS, 1, 1),
        output_shapes=((N, Dv),),
        output_dtypes=(dtype,),
        ensure_row_contiguous=True,
    )


def _kernel(backend: str, spec: launch.LaunchSpec):
    if backend == "metal":
        from ..metal.kernel import kernel

        return kernel(spec)
    from ..cuda.kernel import kernel_for_spec

    return kernel_for_spec(spec)


def _variant(backend: str, spec: launch.LaunchSpec):
    from ..cuda.kernel import recurrent_header
    from ..fallback import variant

    if backend == "metal":
        return (variant(spec.name, spec.template, spec.header(), spec.source()),)
    return (variant(spec.name, spec.template, recurrent_header(spec), launch.compact(spec.source())),)


def _kernel_backend(backend: str, p: Problem) -> Optional[str]:
    # "metal" or "cuda" where `backend` resolves to one of them for the recurrence of `p`.
    try:
        mod, _ = backends.resolve(backend, "recurrent", p)
    except ValueError:
        return None
    return mod.name if mod.name in ("metal", "cuda") else None


def _trusted(backend: str, name: str, spec: launch.LaunchSpec, probe, what: str, instead: str) -> bool:
    # Under "auto", the variant's verdict (tried once per process); explicit backends are trusted.
    from .. import fallback

    vs = _variant(name, spec)
    if backend != "auto":
        return True
    bad = fallback.tried(name, vs, probe)
    if bad is not None:
        fallback.warn_once(name, vs, what, bad, instead)
        return False
    return True


def _probe_text(errs, dtype) -> Optional[str]:
    from ..testing import tolerance

    tol = tolerance(dtype)
    if not all(e < tol for e in errs):  # NaN fails too
        return f"wrong result: relative errors {', '.join(f'{e:.1e}' for e in errs)} (bound {tol:.0e})"
    return None


def prep_backend(backend: str, qkv, conv_state, w, mask, Hk: int, Hv: int, Dk: int, Dv: int) -> Optional[str]:
    """"metal" or "cuda" when the prep launch takes this call, else None (the unfused path runs).

    qkv [B, S, C] (S > 1); conv_state [B, K-1, C] in qkv's dtype; w [C, K, 1]; mask [B, S] bool or None.
    """
    key = ("prefill_prep", backend, qkv.shape, qkv.dtype, conv_state.shape, conv_state.dtype, w.shape,
           None if mask is None else (mask.shape, mask.dtype), Hk, Hv, Dk, Dv)
    return backends.remembered(key, _prep_backend, backend, qkv, conv_state, w, mask, Hk, Hv, Dk, Dv)


def _prep_backend(backend, qkv, conv_state, w, mask, Hk, Hv, Dk, Dv) -> Optional[str]:
    if not conv_layout_fits(qkv, conv_state, w, Hk, Hv, Dk, Dv):
        return None
    B, S, C = qkv.shape
    K = w.shape[1]
    if mask is not None and (mask.shape != (B, S) or mask.dtype != mx.bool_):
        return None
    if S < 2 or S > _GRID_YZ or B > _GRID_YZ or B * S * C >= 2**31 or max(Dk, Dv) > 256:
        return None
    name = _kernel_backend(backend, Problem(B, S, Hk, Hv, Dk, Dv, qkv.dtype, "scalar", mask is not None, True))
    if name is None:
        return None
    masked = mask is not None
    spec = prep_spec(B, S, K, Hk, Hv, Dk, Dv, qkv.dtype, masked)
    probe = lambda: _probe_prep(name, K, Hk, Hv, Dk, Dv, qkv.dtype, masked)  # noqa: E731
    ok = _trusted(backend, name, spec, probe, f"fused prefill prep, backend {name!r}", "the unfused conv and norms")
    return name if ok else None


def norm_backend(backend: str, y, z, weight, eps) -> Optional[str]:
    """"metal" or "cuda" when the gated-norm launch takes rms_norm(y) * weight * silu(z), else None.

    y [..., Dv] (the recurrence output); z of y's shape; weight [Dv]; eps a float >= 0.
    """
    key = ("gated_norm", backend, y.shape, y.dtype, z.shape, z.dtype, weight.shape, weight.dtype, eps)
    return backends.remembered(key, _norm_backend, backend, y, z, weight, eps)


def _norm_backend(backend, y, z, weight, eps) -> Optional[str]:
    if y.ndim < 2 or z.shape != y.shape or weight.shape != (y.shape[-1],):
        return None
    if y.dtype not in _FLOATS or z.dtype not in _FLOATS or weight.dtype not in _FLOATS:
        return None
    if not isinstance(eps, (int, float)) or eps < 0 or y.size >= 2**31 or y.shape[-1] > 1024:
        return None
    Dv = y.shape[-1]
    name = _kernel_backend(backend, Problem(1, 1, 1, 1, 32, Dv, y.dtype, "scalar", False, False))
    if name is None:
        return None
    nd = mx.result_type(y.dtype, weight.dtype)
    spec = norm_spec(y.size // Dv, Dv, y.dtype, z.dtype, nd, float(eps))
    probe = lambda: _probe_norm(name, Dv, y.dtype, z.dtype, weight.dtype, float(eps))  # noqa: E731
    ok = _trusted(backend, name, spec, probe, f"fused gated norm, backend {name!r}", "rms_norm and the gate")
    return name if ok else None


@backends.on_clear
def _clear_launchers():
    _prep_launcher.cache_clear()
    _norm_launcher.cache_clear()


@lru_cache(maxsize=256)
def _prep_launcher(backend, B, S, K, Hk, Hv, Dk, Dv, dtype, masked):
    spec = prep_spec(B, S, K, Hk, Hv, Dk, Dv, dtype, masked)
    return _kernel(backend, spec), spec.call_kwargs()


@lru_cache(maxsize=256)
def _norm_launcher(backend, N, Dv, dtype, z_dtype, norm_dtype, eps):
    spec = norm_spec(N, Dv, dtype, z_dtype, norm_dtype, eps)
    return _kernel(backend, spec), spec.call_kwargs()


def prep(backend: str, qkv, conv_state, w, mask, Hk: int, Hv: int, Dk: int, Dv: int
         ) -> Tuple[mx.array, mx.array, mx.array]:
    """(q [B,S,Hk,Dk], k [B,S,Hk,Dk], v [B,S,Hv,Dv]) in qkv's dtype, from one launch on backend "metal"
    or "cuda" (inputs as `prep_backend` accepts them): silu(conv) split, q and k L2-normalised, q
    scaled by Dk**-0.5. The new conv state is `conv_tail`."""
    B, S, _ = qkv.shape
    kern, kw = _prep_launcher(backend, B, S, w.shape[1], Hk, Hv, Dk, Dv, qkv.dtype, mask is not None)
    ins = [qkv, conv_state, w] + ([] if mask is None else [mask])
    q, k, v = kern(inputs=ins, **kw, **launch.launch_options())
    return q, k, v


def conv_tail(qkv, conv_state, mask) -> mx.array:
    """The conv state after this call: its last K - 1 inputs (masked inputs as zeros), [B, K-1, C]."""
    n_keep = conv_state.shape[1]
    S = qkv.shape[1]
    if mask is not None:
        keep = min(S, n_keep)
        tail = mx.where(mask[:, S - keep:, None], qkv[:, S - keep:], 0)
    else:
        tail = qkv[:, max(S - n_keep, 0):]
    if S < n_keep:
        return mx.concatenate([conv_state[:, S:], tail], axis=1)
    return mx.contiguous(tail)


def gated_norm(backend: str, y, z, weight, eps: float) -> mx.array:
    """rms_norm(y) * weight * silu(z) over the last axis, in y's dtype (one launch; inputs as
    `norm_backend` accepts them)."""
    Dv = y.shape[-1]
    nd = mx.result_type(y.dtype, weight.dtype)
    kern, kw = _norm_launcher(backend, y.size // Dv, Dv, y.dtype, z.dtype, nd, float(eps))
    (out,) = kern(inputs=[y.reshape(-1, Dv), z.reshape(-1, Dv), weight], **kw, **launch.launch_options())
    return out.reshape(y.shape)


def random_prep_inputs(B: int, S: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype, masked: bool,
                       seed: int):
    """Seeded (qkv, conv_state, w, mask) of one prep call, like a layer's (a left-padded row when masked)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    C = 2 * Hk * Dk + Hv * Dv
    f = lambda *s, scale=1.0: mx.array((rng.standard_normal(s) * scale).astype(np.float32)).astype(dtype)  # noqa: E731
    mask = None
    if masked:
        m = np.ones((B, S), bool)
        m[-1, : S // 2] = False
        mask = mx.array(m)
    return f(B, S, C), f(B, K - 1, C), f(C, K, 1, scale=0.5), mask


def check_prep(backend: str, B: int, S: int, K: int, Hk: int, Hv: int, Dk: int, Dv: int, dtype: mx.Dtype,
               masked: bool, seed: int = 0):
    """(q, k, v, conv state) relative errors of the prep launch (and `conv_tail`) against the float64
    reference `reference.layer_prep`, for seeded inputs; raises what the kernel raises."""
    from ..reference import layer_prep, rel_error

    qkv, cs, w, mask = random_prep_inputs(B, S, K, Hk, Hv, Dk, Dv, dtype, masked, seed)
    outs = prep(backend, qkv, cs, w, mask, Hk, Hv, Dk, Dv) + (conv_tail(qkv, cs, mask),)
    mx.eval(*outs)
    refs = layer_prep(qkv, cs, w, mask, Hk, Dk, Dv)
    return tuple(rel_error(o, r) for o, r in zip(outs, refs))


def check_norm(backend: str, N: int, Dv: int, dtype: mx.Dtype, z_dtype: mx.Dtype, weight_dtype: mx.Dtype,
               eps: float, seed: int = 0) -> float:
    """Relative error of the gated-norm launch against `reference.gated_rms_norm`, seeded inputs."""
    import numpy as np

    from ..reference import gated_rms_norm, rel_error

    rng = np.random.default_rng(seed)
    y = mx.array(rng.standard_normal((N, Dv)).astype(np.float32)).astype(dtype)
    z = mx.array(rng.standard_normal((N, Dv)).astype(np.float32)).astype(z_dtype)
    weight = mx.array((1.0 + 0.3 * rng.standard_normal(Dv)).astype(np.float32)).astype(weight_dtype)
    out = gated_norm(backend, y, z, weight, eps)
    mx.eval(out)
    return rel_error(out, gated_rms_norm(y, z, weight, eps))


def _probe_prep(backend, K, Hk, Hv, Dk, Dv, dtype, masked) -> Optional[str]:
    from ..fallback import failure_text

    try:  # the smallest call of the same variant (B and S are not in the template)
        errs = check_prep(backend, 2 if masked else 1, 3, K, Hk, Hv, Dk, Dv, dtype, masked)
    except Exception as exc:  # noqa: BLE001 -- any failure of the kernel is the verdict
        return failure_text(exc)
    return _probe_text(errs, dtype)


def _probe_norm(backend, Dv, dtype, z_dtype, weight_dtype, eps) -> Optional[str]:
    from ..fallback import failure_text

    try:
        err = check_norm(backend, 5, Dv, dtype, z_dtype, weight_dtype, eps)
    except Exception as exc:  # noqa: BLE001
        return failure_text(exc)
    return _probe_text((err,), dtype)
