"""Serving calls (packed sequences, state pools, per-step states) in MLX ops: exact, any device.

Packed sequences (cu_seqlens) run one after another through `recurrent_rule_states` or
`chunked_rule`, so this path reads cu_seqlens back to the host (a sync) whatever
`check_values` says. Per-step states come from the recurrent loop, or from the chunked form's
chunk-end states when `every` is a multiple of its chunk length (else the recurrent loop runs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from ..validate import Problem, Serving
from .recurrent import recurrent_rule_states


def gather_rows(pool: mx.array, state_indices: mx.array) -> mx.array:
    """[N, Hv, Dv, Dk]: pool[state_indices[n]], zeros where the index is negative."""
    rows = pool[mx.maximum(state_indices, 0)]
    return mx.where((state_indices >= 0)[:, None, None, None], rows, 0.0)


def _one(q, k, v, g, beta, state, mask, algorithm: str, every: int):
    """(y, final state, states or None) of one batch of sequences of equal length."""
    if algorithm == "chunked":
        from .chunked import chunk_size, chunked_rule

        T = q.shape[1]
        if T > 0 and (every == 0 or every % chunk_size(T) == 0):
            if every == 0:
                y, s = chunked_rule(q, k, v, g, beta, state, mask)
                return y, s, None
            return chunked_rule(q, k, v, g, beta, state, mask, every=every)
    return recurrent_rule_states(q, k, v, g, beta, state, mask, every=every)


def run_serving(p: Problem, s: Serving, q, k, v, g, beta, state, mask, cu_seqlens, *, algorithm: str
                ) -> Tuple[mx.array, mx.array, Optional[mx.array]]:
    """(y [B,T,Hv,Dv], final states [N,Hv,Dv,Dk] float32, states or None) from initial states
    `state` [N,Hv,Dv,Dk] (rows already taken from the pool). Layout of the states as in
    `mlx_gdn.gated_delta_rule`."""
    if not s.packed:
        return _one(q, k, v, g, beta, state, mask, algorithm, s.every)
    cu = np.array(cu_seqlens).tolist()
    ys, finals, kept = [], [], []
    for n in range(s.N):
        a, b = cu[n], cu[n + 1]
        s0 = state[n : n + 1]
        if b == a:
            finals.append(s0)
            continue
        cut = lambda x: x[:, a:b]  # noqa: E731
        y, fin, st = _one(*(cut(x) for x in (q, k, v, g, beta)), s0, None if mask is None else cut(mask),
                          algorithm, s.every)
        ys.append(y)
        finals.append(fin)
        if st is not None:
            kept.append(st)
    return join_sequences(p, s, ys, finals, kept)


def join_sequences(p, s, ys, finals, kept):
    """(y [1, T, Hv, Dv], final states [N, Hv, Dv, Dk], states or None) of packed sequences run one
    by one: their outputs along T, their final states, and (return_states) their kept states in
    order with zero slots after the last sequence's (the layout of `mlx_gdn.serving`)."""
    y = mx.concatenate(ys, axis=1) if ys else mx.zeros((1, 0, p.Hv, p.Dv), p.dtype)
    states = None
    if s.every:
        used = sum(x.shape[1] for x in kept)
        pad = mx.zeros((1, s.slots - used, p.Hv, p.Dv, p.Dk), mx.float32)
        states = mx.concatenate(kept + [pad], axis=1)
    return y, mx.concatenate(finals, axis=0), states
