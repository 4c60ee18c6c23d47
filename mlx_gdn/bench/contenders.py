"""Everything the benchmark can time, discovered at run time: this package's paths and peers."""

from __future__ import annotations

from typing import List, Optional, Tuple

import mlx.core as mx

from .. import backends
from ..validate import Problem
from .contender import Contender
from .contenders_fla import fla_contenders
from .inputs import InputSet, mx_dtype
from .shapes import Config

ALGORITHMS = ("recurrent", "chunked")
GATINGS = ("fused", "precomputed")


def problem(cfg: Config, fused: bool) -> Problem:
    """The Problem the public API would derive for this cell (no mask, scalar gate)."""
    return Problem(cfg.B, cfg.T, cfg.Hk, cfg.Hv, cfg.Dk, cfg.Dv, mx_dtype(cfg.dtype), "scalar", False, fused)


def auto_route(cfg: Config) -> Optional[Tuple[str, str]]:
    """(backend, algorithm) that backend="auto", algorithm="auto" picks for this cell."""
    try:
        mod, algo = backends.resolve("auto", "auto", problem(cfg, True))
    except Exception:
        return None
    return getattr(mod, "name", mod.__name__.rsplit(".", 1)[-1]), algo


def _gdn_contender(backend: str, algorithm: str, gating: str) -> Contender:
    import mlx_gdn

    fused = gating == "fused"

    def unsupported(cfg: Config) -> Optional[str]:
        mod = backends.module(backend)
        if mod is None or not mod.available():
            return f"backend {backend!r} not available"
        try:
            ok = mod.supports(problem(cfg, fused), algorithm)
        except Exception as e:  # a backend under construction must not stop the run
            return f"supports() raised {type(e).__name__}: {e}"
        # Unsupported shapes would silently fall back to ops inside the API: skip, don't mislabel.
        return None if ok else f"{backend}/{algorithm} does not support this shape"

    def prepare(s: InputSet):
        if fused:
            return lambda: mlx_gdn.gated_delta_update(
                s.q, s.k, s.v, s.a, s.b, s.A_log, s.dt_bias, s.state, backend=backend, algorithm=algorithm
            )
        return lambda: mlx_gdn.gated_delta_rule(s.q, s.k, s.v, s.g, s.beta, s.state, backend=backend, algorithm=algorithm)

    api = "gated_delta_update" if fused else "gated_delta_rule"
    return Contender(
        name=f"mlx-gdn {backend} {algorithm} {gating}",
        family="mlx-gdn",
        gating=gating,
        prepare=prepare,
        description=f"mlx_gdn.{api}(backend={backend!r}, algorithm={algorithm!r})",
        unsupported=unsupported,
        route=(backend, algorithm),
        meta={"tolerance": _stated_tolerance(backend, algorithm)},
    )


def _stated_tolerance(backend: str, algorithm: str) -> dict:
    """dtype -> relative error bound a path documents where it differs from the package default."""
    if (backend, algorithm) == ("ops", "chunked"):
        from ..ops.chunked import float32_tolerance

        return {"float32": float32_tolerance()}
    return {}


def usable_backends() -> List[str]:
    """Backends that import and report available; one that fails to import is left out, not fatal."""
    names = []
    for name in ("metal", "cuda", "ops"):
        try:
            mod = backends.module(name)
            if mod is not None and mod.available():
                names.append(name)
        except Exception:  # a backend module under construction must not stop the benchmark
            continue
    return names


def gdn_contenders() -> List[Contender]:
    """This package's paths: every available backend x algorithm x gating form."""
    out = []
    for backend in usable_backends():
        for algorithm in ALGORITHMS:
            for gating in GATINGS:
                out.append(_gdn_contender(backend, algorithm, gating))
    return out


def _metal_gpu() -> bool:
    return mx.metal.is_available() and mx.default_device().type == mx.gpu


def mlx_lm_contenders() -> List[Contender]:
    """mlx-lm's entry point as models call it (the speed-up baseline), its ops loop, and its
    Metal kernel where Metal runs."""
    try:
        from mlx_lm.models import gated_delta as gd
    except ImportError:
        return []
    path = "Metal kernel" if _metal_gpu() else "ops loop"
    out = [
        Contender(
            name="mlx-lm default",
            family="mlx-lm",
            gating="fused",
            prepare=lambda s: lambda: gd.gated_delta_update(s.q, s.k, s.v, s.a, s.b, s.A_log, s.dt_bias, s.state),
            description=f"mlx_lm gated_delta_update (on this device: {path})",
            baseline=True,
        ),
        Contender(
            name="mlx-lm ops",
            family="mlx-lm",
            gating="precomputed",
            prepare=lambda s: lambda: gd.gated_delta_ops(s.q, s.k, s.v, s.g, s.beta, s.state),
            description="mlx_lm gated_delta_ops (per-step compiled ops loop)",
        ),
    ]
    if _metal_gpu():

        def dk_ok(cfg: Config) -> Optional[str]:
            return None if cfg.Dk % 32 == 0 else "mlx-lm's kernel needs Dk % 32 == 0"

        out.append(
            Contender(
                name="mlx-lm kernel",
                family="mlx-lm",
                gating="precomputed",
                prepare=lambda s: lambda: gd.gated_delta_kernel(s.q, s.k, s.v, s.g, s.beta, s.state),
                description="mlx_lm gated_delta_kernel (Metal)",
                unsupported=dk_ok,
            )
        )
    return out


def mlx_fast_contenders() -> List[Contender]:
    """MLX's own `mx.fast.gated_delta_update` (g linear, state [B,Hv,Dv,Dk]), where it exists."""
    fn = getattr(mx.fast, "gated_delta_update", None)
    if fn is None:
        return []
    return [
        Contender(
            name="mx.fast.gated_delta_update",
            family="mlx",
            gating="precomputed",
            prepare=lambda s: lambda: fn(s.q, s.k, s.v, s.g, s.beta, s.state),
            description=f"mlx {mx.__version__} mx.fast.gated_delta_update",
        )
    ]


def discover(extra: Optional[List[Contender]] = None) -> List[Contender]:
    """All contenders that can run here, this package's first; `extra` appended (tests, experiments)."""
    found = gdn_contenders() + mlx_lm_contenders() + mlx_fast_contenders() + fla_contenders()
    return found + list(extra or [])
