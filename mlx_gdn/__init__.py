"""mlx-gdn: Gated DeltaNet kernels for MLX (Metal, CUDA and ops paths)."""

from .api import gated_delta_rule, gated_delta_update
from .backends import available_backends
from .explain import Explanation, explain
from .gating import compute_beta, compute_g, compute_gates, normalize_qk

from ._version import __version__

__all__ = [
    "gated_delta_rule",
    "gated_delta_update",
    "available_backends",
    "explain",
    "Explanation",
    "compute_g",
    "compute_beta",
    "compute_gates",
    "normalize_qk",
    "GatedDeltaNet",
    "patch",
    "unpatch",
]


def __getattr__(name):
    # The module and patch import mlx.nn lazily so the kernels stay importable alone.
    if name in ("GatedDeltaNet", "patch", "unpatch"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'mlx_gdn' has no attribute {name!r}")
