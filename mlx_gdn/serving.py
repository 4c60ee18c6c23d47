"""Serving calls: packed sequences (cu_seqlens), state pools (state_indices) and per-step
states (return_states), planned, run on a backend and written back into the pool.

Layouts (also in `mlx_gdn.gated_delta_rule`'s docstring):
- states with return_states="steps": [B, T, Hv, Dv, Dk], the state after each token; with
  cu_seqlens, index t is the state after packed token t (its own sequence's state).
- states with return_states=C: [B, T // C, Hv, Dv, Dk], the states after tokens C, 2C, ... With
  cu_seqlens, boundaries are counted within each sequence: sequence n has len_n // C of them, in
  slots `boundary_offsets(cu_seqlens, C)[n]` onwards; the slots past the last sequence's are zero.
- pool write-back: a scatter of the N final states into rows state_indices (negative: dropped).

Which path runs (each backend's `serving_algorithm`, `kernel_serving_algorithm` on Metal and
CUDA), under algorithm "chunked" (asked for, or chosen by "auto" from the total T):
packed sequences (cu_seqlens) run in one launch pair of the chunked kernels where the backend
has that (`PACKED_CHUNKED`, Metal: a chunk table that never crosses a sequence's end, each
sequence from its own pool row; return_states=C with C a multiple of the chunk length included);
elsewhere (CUDA) one plain call per sequence (`run_per_sequence`: the chunked kernels for long
sequences). return_states=C with C a multiple of the backend's chunk length runs its chunked
kernels, which save the state after every C // chunk-th chunk (`CHUNKED_STATES`; on CUDA with
cu_seqlens one such call per sequence). These gather the initial rows from the pool (N of them),
except the packed launch pair, which reads them in place. Every other serving call is one launch
of the recurrent kernels, which read pool rows in place. The ops backend runs everything in MLX
ops.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import mlx.core as mx
import numpy as np

from . import backends, launch
from .validate import Problem, Serving, check_serving, check_serving_values, serving_key


def boundary_offsets(cu_seqlens, C: int) -> np.ndarray:
    """int64 [N + 1]: sequence n's boundary states (return_states=C with cu_seqlens) are slots
    off[n] .. off[n + 1] - 1 of the returned states. Reads cu_seqlens to the host."""
    lens = np.diff(np.asarray(cu_seqlens, dtype=np.int64))
    return np.concatenate([[0], np.cumsum(lens // int(C))])


def plan(backend, algorithm, base_key, check_base, state, cu_seqlens, state_indices, return_states):
    """(problem, serving options, backend module, algorithm, auto) of a serving call, remembered per
    signature like `planner.plan`; auto: backend "auto" (`run` then tries the kernels once first).
    base_key / check_base: the plain call's key and check, both
    made with state=None (the state's leading size depends on the serving arguments)."""
    skey = serving_key(state, cu_seqlens, state_indices, return_states)
    key = None if base_key is None or skey is None else ("serving", base_key, skey, backend, algorithm,
                                                          backends.table_key())

    def make():
        p = check_base()
        s = check_serving(p, state, cu_seqlens, state_indices, return_states)
        return (p, s) + backends.resolve_serving(backend, algorithm, p, s) + (backend == "auto",)

    return make() if key is None else backends.remembered(key, make)


def row_scatter(pool: mx.array, rows: mx.array, vals: mx.array) -> mx.array:
    """pool with rows[n] replaced by vals[n] ([N] int32, [N, ...]), as a new array; `pool` itself
    is unchanged. One scatter of whole rows (`a[idx] = v`: N indices, N row slices), not an
    element-wise scatter with an index per element. `mx.array(pool)` is a second handle on the same
    array, so the assignment rebinds only that handle; the scatter's input is still the pool."""
    out = mx.array(pool)
    out[rows] = vals
    return out


def write_back(pool: mx.array, state_indices: mx.array, final: mx.array) -> mx.array:
    """pool [S, Hv, Dv, Dk] with rows state_indices[n] replaced by final[n] ([N, Hv, Dv, Dk]);
    negative indices write nothing.

    One scatter of whole rows. MLX runs a scatter in place only when nothing else holds the pool's
    buffer when the scatter runs, and a read of the pool pending in the same graph (the kernel's,
    or a gather) holds it until that read's command completes: the scatter then copies all S rows,
    a cost that grows with the pool (measured: bench/NOTES.md, "Serving"). So the final states
    (and the count of live slots) are evaluated first (the kernel runs now: one wait per call), and
    the scatter left lazy runs in place once the caller has rebound its name to the result
    (``y, pool = f(..., state=pool)``).

    Padding slots: with none (the usual step) the scatter takes `final` as it is; with some, each
    padding slot writes the first live sequence's row and final state (duplicate indices then carry
    equal values), a copy of the N final states; with no live slot the pool is returned as it is.
    Under a function transformation (mx.compile), where nothing can be evaluated, the count is not
    known: padding slots write their row's own value back and the scatter, left lazy, copies.
    """
    live = state_indices >= 0
    n_live = live.sum()  # int32
    try:
        mx.eval(final, n_live)
    except ValueError:  # inside mx.compile / grad: evaluation is not allowed there
        return _write_back_lazy(pool, state_indices, final, live)
    n_live = n_live.item()
    if n_live == 0:
        return pool
    if n_live == state_indices.shape[0]:
        return row_scatter(pool, state_indices, final)
    # Some padding: the first live sequence's row and state for the padding slots (no read of the
    # pool, so nothing holds it when the scatter runs).
    first = mx.argmax(live)
    rows = mx.where(live, state_indices, state_indices[first])
    vals = mx.where(live[:, None, None, None], final, final[first][None])
    return row_scatter(pool, rows, vals)


def _write_back_lazy(pool, state_indices, final, live):
    """`write_back` without evaluating anything (under mx.compile): a padding slot writes the value
    another writer of the same row writes (the first live sequence's row and state, or row 0's
    own value when every slot is padding)."""
    first = mx.argmax(live)  # first live sequence (0 when none)
    first_row = state_indices[first]
    fallback_row = mx.maximum(first_row, 0)
    fallback = mx.where(first_row >= 0, final[first], pool[fallback_row])
    rows = mx.where(live, state_indices, fallback_row)
    vals = mx.where(live[:, None, None, None], final, fallback[None])
    return row_scatter(pool, rows, vals)


# The algorithm name a backend's `serving_algorithm` gives for packed sequences it runs one plain
# call each (its chunked kernels for the long ones), see `run_per_sequence`.
PER_SEQUENCE = "per-sequence"


def _slice_gates(gates: dict, sl: slice) -> dict:
    """The gate inputs of tokens `sl` (g/beta, or a FusedGating's a/b)."""
    from .gating import FusedGating

    gating = gates.get("gating")
    if gating is not None:
        return dict(gating=FusedGating(gating.a[:, sl], gating.b[:, sl], gating.A_log, gating.dt_bias,
                                       gating.lower_bound, gating.allow_neg_eigval))
    return dict(g=gates["g"][:, sl], beta=gates["beta"][:, sl])


def _one_sequence(mod, pn, every: int, want: str, q, k, v, init, mask, **gates):
    """(y, final state, states or None) of one sequence (B = 1) on backend `mod`: plain calls when
    no state is asked for or the sequence ends before the first boundary; with return_states=every,
    the chunked kernels' saved states (`run_states`) or one recurrent serving launch."""
    if every and pn.T >= every:
        if want == "chunked" and _saves_states(mod, pn, every):
            return mod.run_states(pn, q, k, v, init, mask, every, **gates)
        sn = Serving(N=1, packed=False, pooled=False, rows=1, every=every, slots=pn.T // every)
        return mod.run_serving(pn, sn, q, k, v, init, mask, None, None, algorithm="recurrent", **gates)
    mod_n, algo = backends.resolve(mod.name, want if mod.supports(pn, want) else "recurrent", pn)
    y, fin = mod_n.run(pn, q, k, v, init, mask, algorithm=algo, **gates)
    return y, fin, None


def run_per_sequence(mod, p, s, q, k, v, init, mask, cu_seqlens, **gates):
    """(y, final states [N, ...], states or None) of packed sequences, one call of backend `mod`
    each (its chunked kernels from the backend's crossover length on, or for any length where the
    table has none: then "chunked" was asked for). Reads cu_seqlens to the host; init:
    [N, Hv, Dv, Dk]. With return_states=C (s.every), sequence n's states fill its slots
    (`boundary_offsets`); slots past the last sequence's are zero."""
    cu = np.array(cu_seqlens).tolist()
    t0 = backends.chunked_from(mod.name, p.dtype)
    ys, finals, kept = [], [], []
    for n in range(s.N):
        a, b = cu[n], cu[n + 1]
        if a == b:
            finals.append(init[n : n + 1])
            continue
        pn = dataclasses.replace(p, B=1, T=b - a)
        want = "chunked" if t0 is None or pn.T >= t0 else "recurrent"
        sl = slice(a, b)
        y, fin, st = _one_sequence(mod, pn, s.every, want, q[:, sl], k[:, sl], v[:, sl], init[n : n + 1],
                                   None if mask is None else mask[:, sl], **_slice_gates(gates, sl))
        ys.append(y)
        finals.append(fin)
        if st is not None:
            kept.append(st)
    from .ops.serving import join_sequences

    return join_sequences(p, s, ys, finals, kept)


def run(planned, q, k, v, state, mask, cu_seqlens, state_indices, check_values: bool, **gates):
    """(y, state) or (y, state, states) of a planned serving call; see the module docstring."""
    p, s, mod, algo, auto = planned
    if check_values:
        check_serving_values(p, s, cu_seqlens, state_indices)
    if auto and mod.name != "ops" and p.T > 0:
        mod, algo = _trusted_route(p, s, mod, algo, *launch.fused_options(gates.get("gating")))
    init = state if state is not None else mx.zeros((s.N, p.Hv, p.Dv, p.Dk), dtype=mx.float32)
    if p.T == 0:
        y = mx.zeros((p.B, 0, p.Hv, p.Dv), dtype=p.dtype)
        final = None if s.pooled else init
        states = mx.zeros((p.B, 0, p.Hv, p.Dv, p.Dk), dtype=mx.float32)
    elif algo == PACKED_CHUNKED:
        y, final, states = mod.run_packed(p, s, q, k, v, init, mask, cu_seqlens, state_indices, **gates)
    elif algo in (PER_SEQUENCE, CHUNKED_STATES):
        from .ops.serving import gather_rows

        rows = gather_rows(init, state_indices) if s.pooled else init
        if algo == PER_SEQUENCE:
            y, final, states = run_per_sequence(mod, p, s, q, k, v, rows, mask, cu_seqlens, **gates)
        else:
            y, final, states = mod.run_states(p, q, k, v, rows, mask, s.every, **gates)
    else:
        y, final, states = mod.run_serving(p, s, q, k, v, init, mask, cu_seqlens, state_indices, algorithm=algo,
                                           **gates)
    if s.pooled:
        new_state = state if final is None else write_back(state, state_indices, final)
    else:
        new_state = final
    return (y, new_state, states) if s.every else (y, new_state)


@backends.on_clear
def _clear_routes():
    _trusted_route.cache_clear()


@lru_cache(maxsize=256)
def _trusted_route(p: Problem, s, mod, algo: str, lower: bool, neg: bool, dt_key: bool):
    """(module, algorithm) of a serving call under backend "auto": the planned kernel route where one
    small call of the same kind (the same sizes, dtype, gates and serving options) matched the
    float64 reference in this process, else the ops backend, with one warning naming the kernels.
    Remembered per call signature: a server's hot loop asks once."""
    from . import fallback

    base = "recurrent" if algo == "recurrent" else "chunked"
    marker = fallback.variant("serving", (("route", algo), ("pooled", s.pooled), ("packed", s.packed),
                                          ("every", s.every), ("masked", p.masked), ("B", "*"), ("T", "*")))
    try:
        kernels = tuple(mod.variants(p, base, lower, neg, dt_key)) if mod.supports(p, base) else ()
    except Exception:  # noqa: BLE001 -- naming the kernels must not stop the call
        kernels = ()
    vs = kernels + (marker,)
    bad = fallback.tried(mod.name, vs, lambda: _probe_route(p, s, mod, algo, lower, neg, dt_key))
    if bad is None:
        return mod, algo
    fallback.warn_once(mod.name, vs, f"serving call, backend {mod.name!r}, route {algo!r}", bad, "the ops backend")
    ops = backends.module("ops")
    return ops, ops.serving_algorithm(p, s, base)


def _probe_route(p: Problem, s, mod, algo: str, lower: bool, neg: bool, dt_key: bool):
    """None when a small serving call of the same kind on route (mod, algo) matches the float64
    reference (`testing.serving_reference`), else a one-line account of what failed."""
    from .fallback import failure_text
    from .gating import FusedGating
    from .reference import gates as ref_gates
    from .reference import rel_error
    from .testing import serving_inputs, serving_reference, tolerance

    C = s.every if s.every > 1 else 0
    lens = (C + 3, 0, 2) if s.packed else None  # a boundary, an empty and a short sequence
    B, T = (1, sum(lens)) if s.packed else (2, C + 3 if C else 3)
    N = len(lens) if s.packed else B
    per_key = p.fused and p.gate == "key"
    try:
        x, state, cu, idx = serving_inputs(lens, B, T, p.Hk, p.Hv, p.Dk, p.Dv, dtype=p.dtype, seed=0, gate=p.gate,
                                           masked=p.masked, pool=N + 1 if s.pooled else 0,
                                           fused_gate="key" if per_key else "scalar")
        every = None if not s.every else ("steps" if s.every == 1 else s.every)
        ps = dataclasses.replace(p, B=B, T=T)
        ss = check_serving(ps, state, cu, idx, every)
        if p.fused:
            lb = -5.0 if lower else None
            dt_bias = x.dt_bias if dt_key or not per_key else x.dt_bias[:, 0]
            kw = dict(gating=FusedGating(x.a, x.b, x.A_log, dt_bias, lb, bool(neg)))
            g, beta = ref_gates(x.a, x.b, x.A_log, dt_bias, lb, bool(neg))
        else:
            kw = dict(g=x.g, beta=x.beta)
            g, beta = x.g, x.beta
        out = run((ps, ss, mod, algo, False), x.q, x.k, x.v, state, x.mask, cu, idx, False, **kw)
        mx.eval(*out)
    except Exception as exc:  # noqa: BLE001 -- any failure of the kernels is the verdict
        return failure_text(exc)
    want = serving_reference(x.q, x.k, x.v, g, beta, state, x.mask, cu, idx, every or 0)
    tol = tolerance(p.dtype)
    errs = [rel_error(o, w) for o, w in zip(out, want) if w is not None]
    if not all(e < tol for e in errs):  # NaN fails too
        shown = ", ".join(f"{e:.1e}" for e in errs)
        return f"wrong result: relative errors {shown} against the float64 reference (bound {tol:.0e})"
    return None


# The algorithm name for B sequences (no cu_seqlens) with return_states=C on a backend's chunked
# kernels, which save the state after every C // chunk-th chunk (the backend's `run_states`).
CHUNKED_STATES = "chunked-states"


# The algorithm name for packed sequences in one launch pair of a backend's chunked kernels
# (its `run_packed`: a chunk table per sequence, each sequence from its own initial row).
PACKED_CHUNKED = "packed-chunked"


def _saves_states(mod, p: Problem, every: int) -> bool:
    """Whether backend `mod`'s chunked kernels return the states after every `every` tokens of
    problem `p` (a backend without `saves_states` cannot)."""
    saves = getattr(mod, "saves_states", None)
    return bool(saves is not None and saves(p, every))


def kernel_serving_algorithm(p: Problem, s, algorithm: str, mod=None):
    """How the Metal and CUDA backends (`mod`) run a serving call under `algorithm` (already
    resolved from "auto" by T):
    - packed sequences under "chunked" where the backend packs them (`packs`; Metal): one launch
      pair of its chunked kernels (`PACKED_CHUNKED`), return_states=C with C a multiple of the
      chunk length included;
    - return_states=C under "chunked", C a multiple of the backend's chunk length (`saves_states`):
      its chunked kernels, which save the state after every C // chunk-th chunk (`CHUNKED_STATES`;
      pool rows gathered first), or with cu_seqlens one such call per sequence (`PER_SEQUENCE`);
    - packed sequences without per-step states under "chunked": one plain call per sequence;
    - everything else on the recurrent kernels (a requested "chunked" included: "steps", and C
      not a multiple of the chunk length); None where those cannot take it."""
    packs = getattr(mod, "packs", None)
    if algorithm == "chunked" and s.packed and packs is not None and packs(p, s):
        return PACKED_CHUNKED
    if algorithm == "chunked" and s.every > 1 and mod is not None and _saves_states(mod, p, s.every):
        if not s.packed:
            return CHUNKED_STATES
        if launch.supports_serving(p, s):  # its short sequences run on the recurrent kernels
            return PER_SEQUENCE
    if algorithm == "chunked" and s.packed and not s.every:
        return PER_SEQUENCE
    return "recurrent" if launch.supports_serving(p, s) else None
