"""mlx-lm's `mlx_lm.models.gated_delta` names, on this package's paths.

``from mlx_gdn import gated_delta`` stands in for ``from mlx_lm.models import gated_delta``
(mlx-lm 0.32.2): every public function there exists here with the same parameters (and more),
and gives the same answer within float32 rounding. Differences, all deliberate:
a masked step writes y = 0 on every path (mlx-lm's ops path leaves it as computed; its kernels
write 0); where exp(A_log) overflows float32 the gates keep their limit (mlx-lm's are NaN);
a bf16/f16 state comes back in its own dtype on every path.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from .api import gated_delta_rule, gated_delta_update
from .backends import is_available
from .gating import compute_g, normalize_qk

__all__ = [
    "compute_g",
    "compute_lower_bound_g",
    "normalize_qk",
    "gated_delta_ops",
    "gated_delta_kernel",
    "gated_delta_kernel_unpacked",
    "gated_delta_kernel_xtree",
    "gated_delta_update",
]


def compute_lower_bound_g(A_log: mx.array, a: mx.array, dt_bias: mx.array, lower_bound: float) -> mx.array:
    """``exp(lower_bound * sigmoid(exp(A_log) * (a + dt_bias)))``, float32, shapes broadcast
    (`compute_g` with ``lower_bound``)."""
    return compute_g(A_log, a, dt_bias, lower_bound)


def gated_delta_ops(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
    mask: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """The exact recurrence in MLX ops (`gated_delta_rule` with backend="ops", recurrent).

    q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g: [B, T, Hv] or [B, T, Hv, Dk]; beta: [B, T, Hv];
    state: [B, Hv, Dv, Dk] any float dtype or None; mask: [B, T] or None.
    Returns y [B, T, Hv, Dv] in q's dtype and the new state (its dtype; float32 for None).
    """
    return gated_delta_rule(q, k, v, g, beta, state, mask, backend="ops", algorithm="recurrent")


def _kernel_backend() -> str:
    for name in ("metal", "cuda"):
        if is_available(name):
            return name
    raise ValueError(
        "gated_delta_kernel needs a GPU backend: no Metal or CUDA device here (and no simulator "
        "active); use gated_delta_ops or gated_delta_rule(backend='auto')"
    )


def gated_delta_kernel(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    mask: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """The recurrent GPU kernel (Metal, else CUDA) with precomputed gates; shapes as
    `gated_delta_ops`, state required. ValueError where no GPU backend is available."""
    return gated_delta_rule(q, k, v, g, beta, state, mask, backend=_kernel_backend(), algorithm="recurrent")


# mlx-lm keeps these two next to its packed kernel for tests of its own layout; here the same
# recurrent kernel answers all three.
gated_delta_kernel_unpacked = gated_delta_kernel
gated_delta_kernel_xtree = gated_delta_kernel
