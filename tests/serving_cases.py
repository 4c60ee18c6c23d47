"""Serving calls (cu_seqlens, state_indices, return_states) and their float64 reference, shared by
tests/test_serving.py (ops path, Metal simulator) and tests/test_cuda.py (GPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

import mlx_gdn
from mlx_gdn import reference
from mlx_gdn.testing import TOLERANCE, random_inputs

F32, BF16 = mx.float32, mx.bfloat16


@dataclass(frozen=True)
class Case:
    """One serving call. lens: packed sequence lengths (cu_seqlens) or None (B rows of T tokens);
    pool: pool rows S (state_indices) or 0; every: 0, 1 ("steps") or C; fused: gated_delta_update."""

    lens: Optional[Tuple[int, ...]]
    B: int = 1
    T: int = 0
    Hk: int = 1
    Hv: int = 2
    Dk: int = 32
    Dv: int = 16
    dtype: object = F32
    gate: str = "scalar"
    masked: bool = False
    pool: int = 0
    every: int = 0
    fused: bool = False
    with_state: bool = True
    fused_gate: str = "scalar"  # "key": Kimi's per-key a [B,T,Hv,Dk] and dt_bias [Hv,Dk]

    @property
    def N(self) -> int:
        return len(self.lens) if self.lens is not None else self.B

    @property
    def return_states(self):
        return None if self.every == 0 else ("steps" if self.every == 1 else self.every)

    def label(self) -> str:
        shape = f"lens{'-'.join(map(str, self.lens))}" if self.lens is not None else f"B{self.B}T{self.T}"
        return (f"{shape}-Hk{self.Hk}Hv{self.Hv}Dk{self.Dk}Dv{self.Dv}-{str(self.dtype).split('.')[-1]}-{self.gate}"
                + ("-mask" if self.masked else "") + (f"-pool{self.pool}" if self.pool else "")
                + (f"-every{self.every}" if self.every else "") + ("-fused" if self.fused else "")
                + ("-keygates" if self.fused_gate == "key" else "")
                + ("" if self.with_state else "-nostate"))


@dataclass
class Call:
    """A case's inputs: x (mlx_gdn.testing.Inputs), state (pool or [N, ...] or None), cu, idx."""

    case: Case
    x: object
    state: Optional[mx.array]
    cu: Optional[mx.array]
    idx: Optional[mx.array]


def make_call(case: Case, seed: int) -> Call:
    """Fresh inputs for `case`; a pool gets padding slots (negative indices) and unused rows."""
    rng = np.random.default_rng(seed + 1)
    B, T = (1, sum(case.lens)) if case.lens is not None else (case.B, case.T)
    x = random_inputs(B, T, case.Hk, case.Hv, case.Dk, case.Dv, dtype=case.dtype, seed=seed, gate=case.gate,
                      mask=case.masked and T > 0, with_state=False, fused_gate=case.fused_gate)
    cu = None
    if case.lens is not None:
        cu = mx.array(np.concatenate([[0], np.cumsum(case.lens)]).astype(np.int32))
    idx, state = None, None
    rows = case.pool if case.pool else case.N
    if case.with_state or case.pool:
        state = mx.array((rng.standard_normal((rows, case.Hv, case.Dv, case.Dk)) * 0.1).astype(np.float32))
    if case.pool:
        assert case.pool >= case.N
        ids = rng.permutation(case.pool)[: case.N].astype(np.int32)
        if case.N > 1:
            ids[rng.integers(case.N)] = -1  # a padding slot
        idx = mx.array(ids)
    return Call(case, x, state, cu, idx)


def run_call(c: Call, backend: str, algorithm: str = "auto", check_values: bool = True):
    """The library's answer: (y, state) or (y, state, states)."""
    x, case = c.x, c.case
    kw = dict(cu_seqlens=c.cu, state_indices=c.idx, return_states=case.return_states, backend=backend,
              algorithm=algorithm, check_values=check_values)
    if case.fused:
        out = mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, c.state, x.mask, **kw)
    else:
        out = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, c.state, x.mask, **kw)
    mx.eval(*out)
    return out


def reference_call(c: Call):
    """float64 (y, state, states or None), sequence by sequence through `reference.delta_rule_steps`."""
    x, case = c.x, c.case
    if case.fused:
        g, beta = reference.gates(x.a, x.b, x.A_log, x.dt_bias)
    else:
        g, beta = reference.to_numpy(x.g), reference.to_numpy(x.beta)
    q, k, v = (reference.to_numpy(a) for a in (x.q, x.k, x.v))
    mask = None if x.mask is None else reference.to_numpy(x.mask)
    B, T, Hv, Dv, Dk = q.shape[0], q.shape[1], case.Hv, case.Dv, case.Dk
    if c.cu is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        cu = np.array(c.cu)
        seqs = [(0, int(cu[n]), int(cu[n + 1])) for n in range(case.N)]
    st = None if c.state is None else reference.to_numpy(c.state)
    idx = None if c.idx is None else np.array(c.idx)
    y = np.zeros((B, T, Hv, Dv))
    finals = np.zeros((case.N, Hv, Dv, Dk))
    slots = 0 if not case.every else (T if case.every == 1 else T // case.every)
    states = np.zeros((B, slots, Hv, Dv, Dk))
    off = 0
    for n, (b, a, e) in enumerate(seqs):
        if idx is not None:
            s0 = st[idx[n]] if idx[n] >= 0 else np.zeros((Hv, Dv, Dk))
        else:
            s0 = st[n] if st is not None else np.zeros((Hv, Dv, Dk))
        sl = (slice(b, b + 1), slice(a, e))
        yr, sr, kept = reference.delta_rule_steps(q[sl], k[sl], v[sl], g[sl], beta[sl], s0[None],
                                                  None if mask is None else mask[sl])
        y[b, a:e] = yr[0]
        finals[n] = sr[0]
        if case.every:
            picked = kept[0, case.every - 1 :: case.every]
            if c.cu is None:
                states[b] = picked
            else:
                states[0, off : off + len(picked)] = picked
                off += len(picked)
    if idx is not None:
        new = st.copy()
        for n in range(case.N):
            if idx[n] >= 0:
                new[idx[n]] = finals[n]
    else:
        new = finals
    return y, new, (states if case.every else None)


def check_call(c: Call, out, context: str) -> None:
    """Assert `out` meets the contract against `reference_call` (the package's tolerance)."""
    case = c.case
    y_ref, s_ref, st_ref = reference_call(c)
    tol = TOLERANCE[case.dtype]
    assert len(out) == (3 if case.every else 2), f"{context}: {len(out)} outputs"
    y, s = out[0], out[1]
    assert y.dtype == case.dtype and s.dtype == mx.float32, f"{context}: dtypes {y.dtype}, {s.dtype}"
    assert tuple(y.shape) == y_ref.shape and tuple(s.shape) == s_ref.shape, f"{context}: shapes {y.shape} {s.shape}"
    checks = [("y", y, y_ref), ("state", s, s_ref)]
    if case.every:
        assert out[2].dtype == mx.float32 and tuple(out[2].shape) == st_ref.shape, f"{context}: states {out[2].shape}"
        checks.append(("states", out[2], st_ref))
    for name, got, ref in checks:
        arr = reference.to_numpy(got)
        assert np.isfinite(arr).all(), f"{context}: non-finite {name}"
        err = reference.rel_error(got, ref)
        assert err < tol, f"{context}: relative error of {name} {err:.2e} (bound {tol:.0e})"
    if c.idx is not None:
        # Rows no sequence writes are the pool's own, bit for bit.
        idx = np.array(c.idx)
        untouched = np.setdiff1d(np.arange(case.pool), idx[idx >= 0])
        assert np.array_equal(np.array(s)[untouched], np.array(c.state)[untouched]), f"{context}: other rows changed"
