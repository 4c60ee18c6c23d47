"""Benchmark inputs (generated on the default device) and the traffic/work each call must do."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..gating import compute_gates, normalize_qk
from .shapes import Config


@dataclass
class InputSet:
    """Everything any contender needs for one call: raw gate inputs and the gates they give."""

    q: mx.array
    k: mx.array
    v: mx.array
    a: mx.array
    b: mx.array
    A_log: mx.array
    dt_bias: mx.array
    g: mx.array  # float32 [B,T,Hv], in (0, 1]
    beta: mx.array  # float32 [B,T,Hv]
    state: mx.array  # float32 [B,Hv,Dv,Dk]


def mx_dtype(name: str) -> mx.Dtype:
    return getattr(mx, name)


def make_inputs(c: Config, seed: int) -> InputSet:
    """Random inputs shaped like a real layer's: q, k normalised, decays spread over (0, 1)."""
    dt = mx_dtype(c.dtype)
    keys = mx.random.split(mx.random.key(seed), 7)
    q = mx.random.normal((c.B, c.T, c.Hk, c.Dk), key=keys[0])
    k = mx.random.normal((c.B, c.T, c.Hk, c.Dk), key=keys[1])
    q, k = normalize_qk(q.astype(dt), k.astype(dt))
    v = mx.random.normal((c.B, c.T, c.Hv, c.Dv), key=keys[2]).astype(dt)
    a = (2.0 * mx.random.normal((c.B, c.T, c.Hv), key=keys[3])).astype(dt)
    b = (2.0 * mx.random.normal((c.B, c.T, c.Hv), key=keys[4])).astype(dt)
    # exp(A_log) in [0.5, 16] as in trained Qwen3.5 layers; dt_bias around 0.
    A_log = mx.log(mx.linspace(0.5, 16.0, c.Hv))
    dt_bias = 0.5 * mx.random.normal((c.Hv,), key=keys[5])
    g, beta = compute_gates(a, b, A_log, dt_bias)
    state = 0.1 * mx.random.normal((c.B, c.Hv, c.Dv, c.Dk), key=keys[6])
    s = InputSet(q, k, v, a, b, A_log, dt_bias, g, beta, state)
    mx.eval(*vars(s).values())
    return s


def itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]


def floor_bytes(c: Config) -> int:
    """Bytes one call must move at least: state read + written once (float32), q, k, v and
    the raw gate inputs a, b read once, y written once (input dtype)."""
    s = itemsize(c.dtype)
    state = 2 * c.B * c.Hv * c.Dv * c.Dk * 4
    qk = 2 * c.B * c.T * c.Hk * c.Dk * s
    vy = 2 * c.B * c.T * c.Hv * c.Dv * s
    gates = 2 * c.B * c.T * c.Hv * s + 2 * c.Hv * 4
    return state + qk + vy + gates


def recurrent_flops(c: Config) -> int:
    """FLOPs of the recurrent form: per step and value head, decay (1), S@k (2), rank-1 update (2)
    and S@q (2) multiply-adds over the Dv x Dk state."""
    return 7 * c.B * c.T * c.Hv * c.Dv * c.Dk


def set_bytes(c: Config) -> int:
    """Device memory one InputSet takes (for choosing how many sets to rotate)."""
    s = itemsize(c.dtype)
    return (
        2 * c.B * c.T * c.Hk * c.Dk * s
        + c.B * c.T * c.Hv * c.Dv * s
        + c.B * c.T * c.Hv * (2 * s + 8)
        + c.B * c.Hv * c.Dv * c.Dk * 4
    )
