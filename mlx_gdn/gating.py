"""Gate computation and q/k normalisation, as Qwen3.5-style models need them.

The one Python definition of the gate math; kernels/gates.h is the same math for every kernel
(same formulas, same overflow handling where exp(A_log) leaves float32). The float64 reference
comparisons of every path, on fused gates, pin the two together.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import mlx.core as mx


def softplus(x: mx.array) -> mx.array:
    """log(1 + exp(x)) without overflow for large x."""
    return mx.maximum(x, 0) + mx.log1p(mx.exp(-mx.abs(x)))


# exp(A_log) overflows float32 above this, and inf * 0 is NaN; past it exp(A_log) * z is formed
# as exp(A_log + log z). The unused branch of each `where` sees safe arguments so that its
# gradient (masked to zero) stays finite.
_LOG_RATE_MAX = 88.0


def _rate_softplus(A_log, x):
    """exp(A_log) * softplus(x); below x = -20, log softplus(x) equals x to float precision."""
    big = A_log > _LOG_RATE_MAX
    sp = softplus(x)
    low = x < -20.0
    log_sp = mx.where(low, x, mx.log(mx.where(low, 1.0, sp)))
    return mx.where(big, mx.exp(mx.where(big, A_log, 0.0) + log_sp), mx.exp(mx.where(big, 0.0, A_log)) * sp)


def _rate_times(A_log, x):
    """exp(A_log) * x for x of either sign."""
    big = (A_log > _LOG_RATE_MAX) & (x != 0)
    ax = mx.where(big, mx.abs(x), 1.0)
    scaled = mx.where(x > 0, 1.0, -1.0) * mx.exp(mx.where(big, A_log, 0.0) + mx.log(ax))
    return mx.where(big, scaled, mx.exp(mx.minimum(A_log, _LOG_RATE_MAX)) * x)


@partial(mx.compile, shapeless=True)
def _decay(a, A_log, dt_bias):
    x = a.astype(mx.float32) + dt_bias.astype(mx.float32)
    return mx.exp(-_rate_softplus(A_log.astype(mx.float32), x))


@partial(mx.compile, shapeless=True)
def _decay_bounded(a, A_log, dt_bias, lower_bound):
    x = a.astype(mx.float32) + dt_bias.astype(mx.float32)
    return mx.exp(lower_bound * mx.sigmoid(_rate_times(A_log.astype(mx.float32), x)))


@partial(mx.compile, shapeless=True)
def _write_strength(b, scale):
    return scale * mx.sigmoid(b.astype(mx.float32))


def compute_g(a: mx.array, A_log: mx.array, dt_bias: mx.array, lower_bound: Optional[float] = None) -> mx.array:
    """Decay gate from the model's raw projections.

    a: [..., Hv] any float dtype; A_log, dt_bias: [Hv]. Returns float32 [..., Hv] in (0, 1]:
    ``exp(-exp(A_log) * softplus(a + dt_bias))``, or with ``lower_bound``
    ``exp(lower_bound * sigmoid(exp(A_log) * (a + dt_bias)))``.
    Compiled, so the elementwise chain is one kernel on GPU backends.
    """
    if lower_bound is None:
        return _decay(a, A_log, dt_bias)
    return _decay_bounded(a, A_log, dt_bias, mx.array(lower_bound, mx.float32))


def compute_beta(b: mx.array, allow_neg_eigval: bool = False) -> mx.array:
    """Write strength ``sigmoid(b)`` (``2 * sigmoid(b)`` with allow_neg_eigval), float32, shape of b."""
    return _write_strength(b, mx.array(2.0 if allow_neg_eigval else 1.0, mx.float32))


def compute_gates(a, b, A_log, dt_bias, lower_bound=None, allow_neg_eigval=False) -> Tuple[mx.array, mx.array]:
    """(g, beta), both float32 [B, T, Hv], from a, b: [B, T, Hv] and A_log, dt_bias: [Hv]."""
    return compute_g(a, A_log, dt_bias, lower_bound), compute_beta(b, allow_neg_eigval)


def normalize_qk(q: mx.array, k: mx.array, eps: float = 1e-6) -> Tuple[mx.array, mx.array]:
    """L2-normalise q and k over the last axis and fold ``Dk**-0.5`` into q.

    q, k: [..., Dk], any float dtype; returns arrays of the same shapes and dtypes.
    ``eps`` is added to the sum of squares (as in mlx-lm and fla's l2norm).
    """
    dk = q.shape[-1]
    inv = dk**-0.5
    # rms_norm adds eps to the mean of squares, so scale it to act on the sum.
    rms_eps = eps * inv * inv
    return (inv * inv) * mx.fast.rms_norm(q, None, rms_eps), inv * mx.fast.rms_norm(k, None, rms_eps)


class FusedGating:
    """The raw gate inputs of `gated_delta_update`, carried to a backend that fuses them.

    a, b: [B, T, Hv]; A_log, dt_bias: [Hv]; any float dtypes.
    """

    __slots__ = ("a", "b", "A_log", "dt_bias", "lower_bound", "allow_neg_eigval")

    def __init__(self, a, b, A_log, dt_bias, lower_bound=None, allow_neg_eigval=False):
        self.a, self.b, self.A_log, self.dt_bias = a, b, A_log, dt_bias
        self.lower_bound, self.allow_neg_eigval = lower_bound, allow_neg_eigval

    def compute(self) -> Tuple[mx.array, mx.array]:
        """(g, beta) float32 [B, T, Hv], for backends that take precomputed gates."""
        return compute_gates(self.a, self.b, self.A_log, self.dt_bias, self.lower_bound, self.allow_neg_eigval)
