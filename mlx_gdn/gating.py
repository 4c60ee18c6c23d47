"""Gate computation and q/k normalisation, as Qwen3.5-style models need them.

The one Python definition of the gate math; kernels/gates.h is the same math for every kernel
(same formulas, same overflow handling where exp(A_log) leaves float32). The float64 reference
comparisons of every path, on fused gates, pin the two together.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np


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
    # Capped where the product overflows: its decay is 0 either way, and exp(inf)'s gradient
    # times a zero cotangent would be NaN.
    log_prod = mx.minimum(mx.where(big, A_log, 0.0) + log_sp, _LOG_RATE_MAX)
    return mx.where(big, mx.exp(log_prod), mx.exp(mx.where(big, 0.0, A_log)) * sp)


def _rate_times(A_log, x):
    """exp(A_log) * x for x of either sign."""
    big = (A_log > _LOG_RATE_MAX) & (x != 0)
    ax = mx.where(big, mx.abs(x), 1.0)
    scaled = mx.where(x > 0, 1.0, -1.0) * mx.exp(mx.minimum(mx.where(big, A_log, 0.0) + mx.log(ax), _LOG_RATE_MAX))
    return mx.where(big, scaled, mx.exp(mx.minimum(A_log, _LOG_RATE_MAX)) * x)


# Decays below exp(LOG_DECAY_FLOOR) (about 4e-18) are formed as exact zeros. What such a decay
# multiplies is below float32's resolution next to anything it is added to, yet carrying it costs
# dearly: its products with the state, keys and other decays fall below float32's smallest normal
# (exp(-87.3)), and a CPU without flush-to-zero runs subnormal arithmetic slower (a state multiply
# 2x on the 2-core AMD CPU, more under load; bench/NOTES.md, "CPU crossover with trained gates").
# Half the normal range: a product of two kept decays (>= exp(-80)) stays normal with three
# orders of magnitude to spare for the key and beta factors it meets.
LOG_DECAY_FLOOR = -40.0
_DECAY_MIN = math.exp(LOG_DECAY_FLOOR)


def decay_exp(log_g: mx.array) -> mx.array:
    """exp(log_g), exactly 0 where log_g < LOG_DECAY_FLOOR (log_g <= 0, -inf allowed).

    exp only sees kept arguments, so the result and its gradient (0 where flushed, where the true
    one is below exp(-40) anyway) stay finite.
    """
    keep = log_g >= LOG_DECAY_FLOOR
    return mx.where(keep, mx.exp(mx.where(keep, log_g, 0.0)), 0.0)


@partial(mx.compile, shapeless=True)
def flush_decay(g: mx.array) -> mx.array:
    """g with values below exp(LOG_DECAY_FLOOR) set to exactly 0; the gradient passes as for g.

    The derivative of a step's output by its own gate does not depend on that gate's value, so
    the unflushed gradient is the exact one for the flushed value too.
    """
    # Compiled: one launch per call instead of five.
    flushed = mx.where(g < _DECAY_MIN, 0.0, g)
    return g + mx.stop_gradient(flushed - g)


@partial(mx.compile, shapeless=True)
def _decay(a, A_log, dt_bias):
    x = a.astype(mx.float32) + dt_bias.astype(mx.float32)
    # Not flushed here: compute_g gives mlx-lm's values (tiny ones included); the ops paths flush
    # the decays they multiply (`flush_decay`, `decay_exp` in the chunked form).
    return mx.exp(-_rate_softplus(A_log.astype(mx.float32), x))


@partial(mx.compile, shapeless=True)
def _decay_bounded(a, A_log, dt_bias, lower_bound):
    x = a.astype(mx.float32) + dt_bias.astype(mx.float32)
    return mx.exp(lower_bound * mx.sigmoid(_rate_times(A_log.astype(mx.float32), x)))


@partial(mx.compile, shapeless=True)
def _write_strength(b, scale):
    return scale * mx.sigmoid(b.astype(mx.float32))


def compute_g(A_log: mx.array, a: mx.array, dt_bias: mx.array, lower_bound: Optional[float] = None) -> mx.array:
    """Decay gate from the model's raw projections, in mlx-lm's argument order.

    ``exp(-exp(A_log) * softplus(a + dt_bias))``, or with ``lower_bound``
    ``exp(lower_bound * sigmoid(exp(A_log) * (a + dt_bias)))``; float32 of the three inputs'
    broadcast shape, values in (0, 1]. Shapes broadcast as in NumPy (as mlx-lm's ``compute_g``
    does): a [..., Hv] with A_log, dt_bias [Hv] for one gate per head, or a [..., Hv, Dk] with
    A_log [Hv, 1] and dt_bias [Hv, 1] or [Hv, Dk] for one gate per key column. Any float dtypes;
    the sum a + dt_bias is formed in float32. Where exp(A_log) overflows float32 the product is
    formed in log space, so the gate keeps its limit (mlx-lm's gives NaN there).
    Compiled, so the elementwise chain is one kernel on GPU backends.
    """
    if lower_bound is None:
        return _decay(a, A_log, dt_bias)
    return _decay_bounded(a, A_log, dt_bias, mx.array(lower_bound, mx.float32))


def compute_beta(b: mx.array, allow_neg_eigval: bool = False) -> mx.array:
    """Write strength ``sigmoid(b)`` (``2 * sigmoid(b)`` with allow_neg_eigval), float32, shape of b."""
    return _write_strength(b, mx.array(2.0 if allow_neg_eigval else 1.0, mx.float32))


def compute_gates(a, b, A_log, dt_bias, lower_bound=None, allow_neg_eigval=False) -> Tuple[mx.array, mx.array]:
    """(g, beta) as `gated_delta_update` computes them, in its argument order.

    a: [B, T, Hv] (g [B, T, Hv]) or [B, T, Hv, Dk] (g [B, T, Hv, Dk], one gate per key column);
    b: [B, T, Hv] (beta [B, T, Hv]); A_log: [Hv] or [Hv, 1], one rate per head; dt_bias: [Hv] or
    [Hv, 1] per head, or [Hv, Dk] with a per-key a. Unlike `compute_g`, which broadcasts as
    given, A_log and dt_bias are always read per head (and key column). Both outputs float32.
    """
    return FusedGating(a, b, A_log, dt_bias, lower_bound, allow_neg_eigval).compute()


def _check_inv_scale(inv_scale) -> float:
    if isinstance(inv_scale, (bool, np.bool_)) or not isinstance(inv_scale, numbers.Real):
        raise TypeError(f"inv_scale must be a float or None, got {type(inv_scale).__name__}")
    if not (math.isfinite(inv_scale) and inv_scale > 0):
        raise ValueError(f"inv_scale must be finite and > 0, got {inv_scale!r}")
    return float(inv_scale)


def normalize_qk(
    q: mx.array, k: mx.array, inv_scale: Optional[float] = None, eps: float = 1e-6
) -> Tuple[mx.array, mx.array]:
    """L2-normalise q and k over the last axis and fold the readout scale into q.

    q, k: [..., Dk], any float dtype; returns arrays of the same shapes and dtypes. With s =
    inv_scale: ``s**2 * rms_norm(q, eps * s**2)`` and ``s * rms_norm(k, eps * s**2)`` (mlx-lm's
    form). At s = ``Dk**-0.5``, the value every model passes (None means it), that is
    ``Dk**-0.5 * q / sqrt(sum(q^2) + eps)`` and ``k / sqrt(sum(k^2) + eps)``: ``eps`` is added
    to the sum of squares (as in mlx-lm and fla's l2norm). inv_scale: a float > 0 or None.
    mlx-lm's keyword call ``normalize_qk(q, k, inv_scale=..., eps=...)`` works unchanged and
    gives its answer.
    """
    inv = q.shape[-1] ** -0.5 if inv_scale is None else _check_inv_scale(inv_scale)
    # rms_norm adds eps to the mean of squares, so scale it to act on the sum.
    rms_eps = eps * inv * inv
    return (inv * inv) * mx.fast.rms_norm(q, None, rms_eps), inv * mx.fast.rms_norm(k, None, rms_eps)


class FusedGating:
    """The raw gate inputs of `gated_delta_update`, carried to a backend that fuses them.

    a: [B, T, Hv] or [B, T, Hv, Dk] (per key column); b: [B, T, Hv]; any float dtypes.
    Kept canonical for the kernels: A_log [Hv]; dt_bias [Hv] (per head) or [Hv, Dk] (per head
    and key column, `dt_key`). Accepts the [Hv, 1] forms mlx-lm's per-key models pass.
    """

    __slots__ = ("a", "b", "A_log", "dt_bias", "lower_bound", "allow_neg_eigval")

    def __init__(self, a, b, A_log, dt_bias, lower_bound=None, allow_neg_eigval=False):
        if A_log.ndim == 2:
            A_log = A_log.reshape(-1)
        if dt_bias.ndim == 2 and dt_bias.shape[1] == 1:
            dt_bias = dt_bias.reshape(-1)
        self.a, self.b, self.A_log, self.dt_bias = a, b, A_log, dt_bias
        self.lower_bound, self.allow_neg_eigval = lower_bound, allow_neg_eigval

    @property
    def key(self) -> bool:
        """a has one gate per key column."""
        return self.a.ndim == 4

    @property
    def dt_key(self) -> bool:
        """dt_bias has one value per key column ([Hv, Dk])."""
        return self.dt_bias.ndim == 2

    def compute(self) -> Tuple[mx.array, mx.array]:
        """(g, beta) float32: g [B, T, Hv] or [B, T, Hv, Dk] (shape of a), beta [B, T, Hv]."""
        A_log, dt_bias = self.A_log, self.dt_bias
        if self.key:
            A_log = A_log[:, None]
            if not self.dt_key:
                dt_bias = dt_bias[:, None]
        return compute_g(A_log, self.a, dt_bias, self.lower_bound), compute_beta(self.b, self.allow_neg_eigval)
