"""Input validation for the public functions: one place, before any kernel runs.

Every failure names the argument, what was expected and what came.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
BACKENDS = ("auto", "metal", "cuda", "ops")
ALGORITHMS = ("auto", "recurrent", "chunked")


@dataclass(frozen=True)
class Problem:
    """Sizes and flavour of one call, derived once from validated inputs."""

    B: int
    T: int
    Hk: int
    Hv: int
    Dk: int
    Dv: int
    dtype: mx.Dtype  # dtype of q, k, v and of the output y
    gate: str  # "scalar" ([B,T,Hv]) or "key" ([B,T,Hv,Dk])
    masked: bool
    fused: bool  # gating computed from a, b, A_log, dt_bias

    @property
    def group(self) -> int:
        """Value heads per key head (Hv // Hk)."""
        return self.Hv // self.Hk


def _name_dtype(dt) -> str:
    return str(dt).replace("mlx.core.", "")


def _require_array(name: str, x) -> mx.array:
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mlx.core.array, got {type(x).__name__}")
    return x


def _require_float(name: str, x: mx.array) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float32, float16 or bfloat16), got {_name_dtype(x.dtype)}"
        )


def _require_shape(name: str, x: mx.array, expected: tuple, what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(x.shape)}")


def check_choice(name: str, value, choices) -> str:
    """`value` must be one of `choices` (a string)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _require_array(name, x)
        if x.ndim != 4:
            what = "[B, T, Hk, Dk]" if name != "v" else "[B, T, Hv, Dv]"
            raise ValueError(f"{name} must have rank 4 {what}, got shape {tuple(x.shape)} (rank {x.ndim})")
        _require_float(name, x)
    B, T, Hk, Dk = q.shape
    _require_shape("k", k, q.shape, "q.shape [B, T, Hk, Dk]")
    if v.shape[0] != B or v.shape[1] != T:
        raise ValueError(f"v must have shape [B, T, Hv, Dv] with B={B}, T={T} from q, got {tuple(v.shape)}")
    Hv, Dv = v.shape[2], v.shape[3]
    if min(B, Hk, Dk, Hv, Dv) <= 0:
        raise ValueError(f"q and v must have non-empty B, H and D axes, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if Hv % Hk != 0:
        raise ValueError(f"v's head count Hv={Hv} must be a multiple of q/k's head count Hk={Hk}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k and v must share one dtype, got q {_name_dtype(q.dtype)}, "
            f"k {_name_dtype(k.dtype)}, v {_name_dtype(v.dtype)}"
        )
    return B, T, Hk, Dk, Hv, Dv


def _check_state_mask(state, mask, B, T, Hv, Dv, Dk):
    if state is not None:
        _require_array("state", state)
        _require_shape("state", state, (B, Hv, Dv, Dk), "[B, Hv, Dv, Dk]")
        # Any float dtype: the recurrence runs in float32 and the new state comes back in this one.
        _require_float("state", state)
    if mask is not None:
        _require_array("mask", mask)
        _require_shape("mask", mask, (B, T), "[B, T]")
        if mask.dtype != mx.bool_ and not mx.issubdtype(mask.dtype, mx.integer):
            raise TypeError(f"mask must be bool (or integer 0/1), got {_name_dtype(mask.dtype)}")


# Validation depends only on the inputs' shapes and dtypes (and the scalar options), so a
# decode loop that calls with the same signature every step validates once: the public
# functions remember each signature's plan (`planner.plan`) under these keys.
def signature(arrays, options) -> Optional[tuple]:
    """Flat tuple of each input's (shape, dtype) and the options; None when an input is not an
    mx.array or an option is unhashable (the full check then reports it)."""
    sig = []
    add = sig.append
    for x in arrays:
        if x is None:
            add(None)
        elif type(x) is mx.array:
            add(x.shape)
            add(x.dtype)
        else:
            return None
    add(options)
    try:
        hash(options)
    except TypeError:
        return None
    return tuple(sig)


def rule_key(q, k, v, g, beta, state, mask) -> Optional[tuple]:
    """`signature` of a `gated_delta_rule` call: equal keys validate alike."""
    return signature((q, k, v, g, beta, state, mask), ("rule",))


def update_key(q, k, v, a, b, A_log, dt_bias, state, mask, lower_bound, allow_neg_eigval) -> Optional[tuple]:
    """`signature` of a `gated_delta_update` call: equal keys validate alike."""
    return signature(
        (q, k, v, a, b, A_log, dt_bias, state, mask),
        ("update", type(lower_bound), lower_bound, type(allow_neg_eigval), allow_neg_eigval),
    )


def check_rule(q, k, v, g, beta, state, mask) -> Problem:
    """Validate the inputs of `gated_delta_rule`; return the call's Problem."""
    B, T, Hk, Dk, Hv, Dv = _check_qkv(q, k, v)
    _require_array("g", g)
    _require_float("g", g)
    if tuple(g.shape) == (B, T, Hv):
        gate = "scalar"
    elif tuple(g.shape) == (B, T, Hv, Dk):
        gate = "key"
    else:
        raise ValueError(
            f"g must have shape [B, T, Hv] = {(B, T, Hv)} (scalar gate) or [B, T, Hv, Dk] = "
            f"{(B, T, Hv, Dk)} (per-key gate), got {tuple(g.shape)}"
        )
    _require_array("beta", beta)
    _require_float("beta", beta)
    _require_shape("beta", beta, (B, T, Hv), "[B, T, Hv]")
    _check_state_mask(state, mask, B, T, Hv, Dv, Dk)
    return Problem(B, T, Hk, Hv, Dk, Dv, q.dtype, gate, mask is not None, False)


def check_update(q, k, v, a, b, A_log, dt_bias, state, mask, lower_bound, allow_neg_eigval) -> Problem:
    """Validate the inputs of `gated_delta_update`; return the call's Problem."""
    B, T, Hk, Dk, Hv, Dv = _check_qkv(q, k, v)
    gate = _check_fused_gate_shapes(a, b, A_log, dt_bias, B, T, Hv, Dk)
    if lower_bound is not None:
        # Any real scalar (NumPy's included, as configs loaded with NumPy give them), never a bool.
        if isinstance(lower_bound, (bool, np.bool_)) or not isinstance(lower_bound, numbers.Real):
            raise TypeError(f"lower_bound must be a float or None, got {type(lower_bound).__name__}")
        if not math.isfinite(lower_bound) or lower_bound > 0:
            # exp(lower_bound * sigmoid(.)) is a decay in (0, 1] only for a finite lower_bound <= 0.
            raise ValueError(f"lower_bound must be finite and <= 0 so the gate stays in (0, 1], got {lower_bound!r}")
    if not isinstance(allow_neg_eigval, bool):
        raise TypeError(f"allow_neg_eigval must be a bool, got {type(allow_neg_eigval).__name__}")
    _check_state_mask(state, mask, B, T, Hv, Dv, Dk)
    return Problem(B, T, Hk, Hv, Dk, Dv, q.dtype, gate, mask is not None, True)


def _check_fused_gate_shapes(a, b, A_log, dt_bias, B, T, Hv, Dk) -> str:
    """Shapes of `gated_delta_update`'s gate inputs; "scalar" or "key" (a per key column).

    a: [B, T, Hv] or [B, T, Hv, Dk]; b: [B, T, Hv]; A_log: [Hv] or [Hv, 1] (one rate per head);
    dt_bias: [Hv] or [Hv, 1] (per head) or, with a per-key a, [Hv, Dk]. The [Hv, 1] forms are
    what mlx-lm's per-key models pass; every accepted combination means the same per-head (or
    per head and key column) formula.
    """
    for name, x in (("a", a), ("b", b), ("A_log", A_log), ("dt_bias", dt_bias)):
        _require_array(name, x)
        _require_float(name, x)
    if tuple(a.shape) == (B, T, Hv):
        gate = "scalar"
    elif tuple(a.shape) == (B, T, Hv, Dk):
        gate = "key"
    else:
        raise ValueError(
            f"a must have shape [B, T, Hv] = {(B, T, Hv)} (one gate per head) or [B, T, Hv, Dk] = "
            f"{(B, T, Hv, Dk)} (one per key column), got {tuple(a.shape)}"
        )
    _require_shape("b", b, (B, T, Hv), "[B, T, Hv]")
    if tuple(A_log.shape) not in ((Hv,), (Hv, 1)):
        raise ValueError(f"A_log must have shape [Hv] = {(Hv,)} or [Hv, 1] = {(Hv, 1)}, got {tuple(A_log.shape)}")
    dt_shapes = [("[Hv]", (Hv,)), ("[Hv, 1]", (Hv, 1))]
    if gate == "key":
        dt_shapes.append(("[Hv, Dk]", (Hv, Dk)))
    if tuple(dt_bias.shape) not in [shape for _, shape in dt_shapes]:
        listed = " or ".join(f"{what} = {shape}" for what, shape in dt_shapes)
        extra = "" if gate == "key" else " ([Hv, Dk] only with a per-key a of shape [B, T, Hv, Dk])"
        raise ValueError(f"dt_bias must have shape {listed}{extra}, got {tuple(dt_bias.shape)}")
    return gate


def kernel_backend(backend, use_kernel) -> str:
    """The backend a call asked for, after mlx-lm's `use_kernel` flag: False means "ops"."""
    if not isinstance(use_kernel, bool):
        raise TypeError(f"use_kernel must be a bool, got {type(use_kernel).__name__}")
    if use_kernel:
        return backend
    if backend in ("auto", "ops"):
        return "ops"
    check_choice("backend", backend, BACKENDS)
    raise ValueError(
        f"use_kernel=False asks for the ops path but backend={backend!r} asks for a kernel; "
        f"pass backend='auto' or 'ops' with use_kernel=False, or use_kernel=True"
    )


# Serving arguments (cu_seqlens, state_indices, return_states): shapes and dtypes here, checked
# once per signature like the rest; values (`check_serving_values`) on every call that asks.


@dataclass(frozen=True)
class Serving:
    """The serving options of one call, derived once from validated shapes.

    N: sequences (B, or len(cu_seqlens) - 1); packed: cu_seqlens given (B == 1, sequences packed
    along T); pooled: state_indices given (state is a pool of `rows` rows); rows: leading size of
    `state` (N without a pool); every: 0 (no per-step states), 1 ("steps") or C (states after
    tokens C, 2C, ... of each sequence); slots: length of the returned states' second axis.
    """

    N: int
    packed: bool
    pooled: bool
    rows: int
    every: int
    slots: int


def serving_requested(cu_seqlens, state_indices, return_states) -> bool:
    """True when any serving argument is given (the call then takes the serving path)."""
    return cu_seqlens is not None or state_indices is not None or return_states is not None


def serving_key(state, cu_seqlens, state_indices, return_states) -> Optional[tuple]:
    """Signature of the serving arguments and the state (shapes, dtypes and return_states), or None
    when one is unhashable. Arrays enter by shape and dtype only: their values are per call."""
    return signature((state, cu_seqlens, state_indices), ("serving", type(return_states), return_states))


def _require_index_array(name: str, x, what: str) -> mx.array:
    _require_array(name, x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D {what}, got shape {tuple(x.shape)}")
    if x.dtype != mx.int32:
        raise TypeError(f"{name} must be int32 {what}, got {_name_dtype(x.dtype)}")
    return x


def check_serving(p: Problem, state, cu_seqlens, state_indices, return_states) -> Serving:
    """Validate the serving arguments' shapes, dtypes and options against problem `p` (whose
    Problem was built without `state`: its leading size depends on them) and `state`."""
    if cu_seqlens is not None:
        _require_index_array("cu_seqlens", cu_seqlens, "[N + 1]")
        if cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens must hold at least one offset (0), got an empty array")
        if p.B != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and requires B == 1, got B={p.B}")
        N = cu_seqlens.shape[0] - 1
    else:
        N = p.B
    if return_states is None:
        every = 0
    elif isinstance(return_states, str):
        if return_states != "steps":
            raise ValueError(f"return_states must be 'steps', a positive int or None, got {return_states!r}")
        every = 1
    elif isinstance(return_states, (int, np.integer)) and not isinstance(return_states, (bool, np.bool_)):
        if return_states <= 0:
            raise ValueError(f"return_states must be 'steps', a positive int or None, got {return_states!r}")
        every = int(return_states)
    else:
        raise TypeError(f"return_states must be 'steps', a positive int or None, got {type(return_states).__name__}")
    if state_indices is not None:
        _require_index_array("state_indices", state_indices, f"[N] (N = {N} sequences)")
        if state_indices.shape[0] != N:
            raise ValueError(
                f"state_indices must have one entry per sequence, N = {N}"
                f" ({'len(cu_seqlens) - 1' if cu_seqlens is not None else 'B'}), got {state_indices.shape[0]}"
            )
        if state is None:
            raise ValueError("state_indices needs state: the pool [S, Hv, Dv, Dk] the indices point into, got None")
    rows = N
    if state is not None:
        _require_array("state", state)
        if state.ndim != 4 or tuple(state.shape[1:]) != (p.Hv, p.Dv, p.Dk):
            raise ValueError(
                f"state must have shape [{'S' if state_indices is not None else 'N'}, Hv, Dv, Dk] with "
                f"(Hv, Dv, Dk) = {(p.Hv, p.Dv, p.Dk)}, got {tuple(state.shape)}"
            )
        if state_indices is None and state.shape[0] != N:
            raise ValueError(
                f"state must have shape [N, Hv, Dv, Dk] = {(N, p.Hv, p.Dv, p.Dk)} (one row per sequence"
                f"{', N = len(cu_seqlens) - 1' if cu_seqlens is not None else ''}), got {tuple(state.shape)}"
            )
        if state.dtype != mx.float32:
            raise TypeError(f"state must be float32 in a serving call (pools and packed initial states are kept in float32), got {_name_dtype(state.dtype)}")
        rows = state.shape[0]
        if state_indices is not None and rows < 1:
            raise ValueError(f"state (the pool) must have at least one row, got shape {tuple(state.shape)}")
    slots = p.T if every == 1 else (p.T // every if every else 0)
    return Serving(N, cu_seqlens is not None, state_indices is not None, rows, every, slots)


def check_serving_values(p: Problem, s: Serving, cu_seqlens, state_indices) -> None:
    """Checks on the values of cu_seqlens and state_indices. Reads both to the host: a sync."""
    if cu_seqlens is not None:
        cu = np.array(cu_seqlens)
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
        if (np.diff(cu) < 0).any():
            at = int(np.argmax(np.diff(cu) < 0))
            raise ValueError(f"cu_seqlens must be non-decreasing, got {int(cu[at])} then {int(cu[at + 1])} at {at}")
        if cu[-1] != p.T:
            raise ValueError(f"cu_seqlens must end at T = {p.T} (q.shape[1]), got {int(cu[-1])}")
    if state_indices is not None:
        idx = np.array(state_indices)
        if (idx >= s.rows).any():
            raise ValueError(
                f"state_indices must be < the pool's {s.rows} rows (negative: a padding slot), got {int(idx.max())}"
            )
        live = idx[idx >= 0]
        if len(np.unique(live)) != len(live):
            vals, counts = np.unique(live, return_counts=True)
            raise ValueError(
                f"state_indices must not repeat a row (two sequences would write one row), got {int(vals[counts > 1][0])} "
                f"{int(counts[counts > 1][0])} times"
            )
