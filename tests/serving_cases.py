"""Serving calls (cu_seqlens, state_indices, return_states) and their float64 reference, shared by
tests/test_serving.py (ops path, Metal simulator) and tests/test_cuda.py (GPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

import mlx_gdn
from mlx_gdn import reference
from mlx_gdn.testing import TOLERANCE, serving_inputs, serving_reference

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
    """Fresh inputs for `case` (`mlx_gdn.testing.serving_inputs`); a pool gets padding slots
    (negative indices) and unused rows."""
    x, state, cu, idx = serving_inputs(case.lens, case.B, case.T, case.Hk, case.Hv, case.Dk, case.Dv,
                                       dtype=case.dtype, seed=seed, gate=case.gate, masked=case.masked,
                                       pool=case.pool, with_state=case.with_state, fused_gate=case.fused_gate)
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
    """float64 (y, state, states or None), sequence by sequence (`mlx_gdn.testing.serving_reference`)."""
    x = c.x
    if c.case.fused:
        g, beta = reference.gates(x.a, x.b, x.A_log, x.dt_bias)
    else:
        g, beta = x.g, x.beta
    return serving_reference(x.q, x.k, x.v, g, beta, c.state, x.mask, c.cu, c.idx, c.case.return_states or 0)


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
