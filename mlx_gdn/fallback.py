"""Kernel verdicts: each kernel variant is tried once per process before a call relies on it.

A Metal compiler can reject what the simulator accepted, and MLX compiles a custom kernel
lazily, so a kernel's failure would otherwise surface only when the caller evaluates its
output. The first time a path (one or two kernel variants) is planned, `route` runs it once on
small inputs of the same template, evaluates the result synchronously and compares it with the
float64 reference. The verdict is kept per variant until `backends.clear_plans`.

Under ``backend="auto"`` a failed path is skipped, with one RuntimeWarning naming the variant:
the same backend's other algorithm comes next, then the ops backend. An explicit
``backend="metal"`` or ``"cuda"`` launches no trial and never falls back: a variant already found
failing in this process raises `KernelFailure`; otherwise the kernel runs as asked, and a
failure surfaces as MLX's own error when the output is evaluated.
Under "auto" the other launches are tried the same way, each by its own module: the fused
layer steps (`models.decode_step`, `models.prefill_step`), the serving routes (`serving`) and the
kernel backwards (`metal.chunked_backward`, `cuda.chunked_backward`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mlx.core as mx

from . import backends


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: its name, template arguments, and a hash of its header and body."""

    name: str
    template: Tuple[Tuple[str, object], ...]
    source_hash: str

    def __str__(self) -> str:
        args = ", ".join(f"{k}={_show(v)}" for k, v in self.template)
        return f"{self.name}<{args}>"


def _show(v) -> str:
    if isinstance(v, mx.Dtype):
        return str(v).replace("mlx.core.", "")
    return str(v).lower() if isinstance(v, bool) else str(v)


def variant(name: str, template, *texts: str) -> Variant:
    """The Variant of kernel `name` with `template` whose header and body are `texts`."""
    h = hashlib.sha1("\0".join(texts).encode()).hexdigest()[:12]
    return Variant(name, tuple((k, v) for k, v in template), h)


class KernelFailure(RuntimeError):
    """A kernel variant failed to compile, failed to run, or disagreed with the reference here."""


# (backend name, variants of one path) -> None (it ran and matched) or what went wrong.
_VERDICTS: Dict[Tuple[str, Tuple[Variant, ...]], Optional[str]] = {}
_WARNED: set = set()


def clear() -> None:
    """Forget every verdict (the kernel factories or the device changed)."""
    _VERDICTS.clear()
    _WARNED.clear()


backends.on_clear(clear)


def describe(variants: Tuple[Variant, ...]) -> str:
    """The variants' names and templates, for messages."""
    return " + ".join(str(v) for v in variants)


def known(mod, algo: str, p, lower: bool, neg: bool, dt_key: bool = False) -> Tuple[Tuple[Variant, ...], Optional[str], bool]:
    """(variants, verdict, decided) of a path without running anything: verdict None when it passed
    or is untried, else what went wrong; decided False while untried."""
    vs = mod.variants(p, algo, lower, neg, dt_key)
    key = (mod.name, vs)
    return vs, _VERDICTS.get(key), key in _VERDICTS


def verdict(mod, algo: str, p, lower: bool, neg: bool, dt_key: bool = False) -> Tuple[Tuple[Variant, ...], Optional[str]]:
    """(variants, None) when backend module `mod` runs algorithm `algo` for problem `p` correctly
    here, else (variants, what went wrong); tried once per variant set."""
    vs = mod.variants(p, algo, lower, neg, dt_key)
    if not vs:  # no kernels to try
        return vs, None
    return vs, tried(mod.name, vs, lambda: _probe(mod, algo, _probe_problem(mod, algo, p, lower, neg, dt_key, vs), lower, neg, dt_key))


def tried(backend: str, variants: Tuple[Variant, ...], probe) -> Optional[str]:
    """The remembered verdict of `variants` on `backend`; `probe()` gives it the first time."""
    key = (backend, variants)
    if key not in _VERDICTS:
        _VERDICTS[key] = probe()
    return _VERDICTS[key]


def warn_once(backend: str, variants: Tuple[Variant, ...], what: str, bad: str, instead: str) -> None:
    """One RuntimeWarning per process (until `clear`) that `variants` failed and `instead` runs."""
    key = (backend, variants)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"mlx_gdn: kernel {describe(variants)} ({what}) failed on this device: {bad}; "
        f"backend='auto' runs {instead} for it from now on in this process",
        RuntimeWarning,
        stacklevel=3,
    )


def failure_text(exc: BaseException) -> str:
    """One line naming the exception (its message's first line)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def _probe_problem(mod, algo, p, lower, neg, dt_key, vs):
    """The smallest problem with the same kernel variants: B=1 and a T on the same path."""
    from .launch import DECODE_MAX_T

    T = min(p.T, 1 if p.T <= DECODE_MAX_T else DECODE_MAX_T + 1)
    for cand in (dataclasses.replace(p, B=1, T=T), dataclasses.replace(p, T=T)):
        if mod.supports(cand, algo) and mod.variants(cand, algo, lower, neg, dt_key) == vs:
            return cand
    return p


# lower_bound of the probe's fused gating (any value <= 0 exercises the branch).
_PROBE_LOWER_BOUND = -5.0


def _probe(mod, algo: str, p, lower: bool, neg: bool, dt_key: bool = False) -> Optional[str]:
    """None when one launch of the path on seeded inputs shaped like `p` runs and matches the
    float64 reference within the package's tolerance, else a one-line account of what failed."""
    from .gating import FusedGating
    from .reference import delta_rule, gates, rel_error, to_numpy
    from .testing import random_inputs, tolerance

    import numpy as np

    per_key = p.fused and p.gate == "key"
    x = random_inputs(p.B, max(p.T, 1), p.Hk, p.Hv, p.Dk, p.Dv, dtype=p.dtype, seed=0, gate=p.gate, mask=p.masked,
                      fused_gate="key" if per_key else "scalar")
    if p.fused:
        lb = _PROBE_LOWER_BOUND if lower else None
        dt_bias = x.dt_bias if dt_key or not per_key else x.dt_bias[:, 0]  # [Hv, Dk] or [Hv]
        kw = dict(gating=FusedGating(x.a, x.b, x.A_log, dt_bias, lb, bool(neg)))
        g, beta = gates(x.a, x.b, x.A_log, dt_bias, lb, bool(neg))
    else:
        kw = dict(g=x.g, beta=x.beta)
        g, beta = x.g, x.beta
    try:
        y, s = mod.run(p, x.q, x.k, x.v, x.state, x.mask, algorithm=algo, **kw)
        mx.eval(y, s)
        y_np, s_np = to_numpy(y), to_numpy(s)
    except Exception as exc:  # noqa: BLE001 -- any failure of the kernel is the verdict
        return failure_text(exc)
    if not (np.isfinite(y_np).all() and np.isfinite(s_np).all()):
        return "non-finite output from finite input"
    y_ref, s_ref = delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)
    tol = tolerance(p.dtype)
    ey, es = rel_error(y_np, y_ref), rel_error(s_np, s_ref)
    if not (ey < tol and es < tol):
        return f"wrong result: relative error y {ey:.1e}, state {es:.1e} against the float64 reference (bound {tol:.0e})"
    return None


def candidates(auto: bool, mod, algo: str, p):
    """Paths in the order they are tried: the chosen one; under auto, the same backend's other
    algorithm where it takes `p`, then the ops backend."""
    out = [(mod, algo)]
    if auto and mod.name != "ops":
        other = "chunked" if algo == "recurrent" else "recurrent"
        if mod.supports(p, other):
            out.append((mod, other))
        out.append((backends.module("ops"), algo))
    return out


def route(auto: bool, mod, algo: str, p, lower: bool = False, neg: bool = False, dt_key: bool = False):
    """(backend module, algorithm) that runs problem `p`: the first candidate whose kernels pass
    (`verdict`). Under auto each failed variant set warns once; otherwise a failure raises
    KernelFailure."""
    for m, a in candidates(auto, mod, algo, p):
        if m.name == "ops":
            return m, a
        # An explicit backend runs its kernel as asked (no trial launch), unless it already failed here.
        vs, bad = verdict(m, a, p, lower, neg, dt_key) if auto else known(m, a, p, lower, neg, dt_key)[:2]
        if bad is None:
            return m, a
        if not auto:
            raise KernelFailure(
                f"kernel {describe(vs)} (backend {m.name!r}, algorithm {a!r}) failed on this device: {bad}. "
                "backend='auto' falls back to another path"
            )
        warn_once(m.name, vs, f"backend {m.name!r}, algorithm {a!r}", bad, _next_name(auto, mod, algo, p, m, a))
    raise AssertionError("the ops backend ends every candidate list")  # pragma: no cover


def _next_name(auto, mod, algo, p, failed_mod, failed_algo) -> str:
    cands = candidates(auto, mod, algo, p)
    i = next(i for i, (m, a) in enumerate(cands) if m is failed_mod and a == failed_algo)
    return " or ".join(f"{m.name} {a}" for m, a in cands[i + 1 :]) or "nothing"
