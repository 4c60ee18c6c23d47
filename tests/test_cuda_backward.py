"""The CUDA chunked backward's pieces: the state pass's saved chunk states (SAVE_EVERY), in the CUDA
simulator, against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlx_gdn.cuda import chunked
from mlx_gdn.reference import delta_rule_steps, rel_error, to_numpy
from mlx_gdn.sim import simulated_cuda
from mlx_gdn.testing import TOLERANCE, fresh_seed, random_inputs
from mlx_gdn.validate import check_rule

DT = {"f32": mx.float32, "bf16": mx.bfloat16}


@pytest.fixture
def in_simulator():
    with simulated_cuda():
        yield


# (T, save_every, dtype, gate, masked, state pass): "smem" the shared-memory pass, "regs" the
# register pass (bf16), per-key gates always the shared-memory one.
SAVE_CASES = [
    (200, 1, "f32", "scalar", False, "smem"),
    (192, 2, "f32", "scalar", True, "smem"),
    (140, 1, "bf16", "scalar", True, "regs"),
    (200, 1, "bf16", "scalar", False, "smem"),
    (130, 1, "f32", "key", True, "smem"),
]


@pytest.mark.parametrize("T,E,dtype,gate,masked,pass_", SAVE_CASES)
def test_saved_chunk_states(in_simulator, monkeypatch, T, E, dtype, gate, masked, pass_):
    """run_chunked(save_every=E) returns the state after tokens 64E, 128E, ... (full chunks only)
    next to y and the final state, for every state-pass variant."""
    monkeypatch.setattr(chunked, "STATE_REGS", pass_ == "regs")
    if pass_ == "regs":
        monkeypatch.setattr(chunked, "STATE_REGS_NW", 2)
    seed = fresh_seed()
    x = random_inputs(1, T, 1, 2, 64, 64, dtype=DT[dtype], seed=seed, gate=gate, mask=masked)
    p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    assert (chunked._regs_config(p) is not None) == (pass_ == "regs")
    y, s, saved = chunked.run_chunked(p, x.q, x.k, x.v, x.state, x.mask, g=x.g, beta=x.beta, save_every=E)
    y0, s0 = chunked.run_chunked(p, x.q, x.k, x.v, x.state, x.mask, g=x.g, beta=x.beta)
    n = T // (64 * E)
    assert saved.shape == (1, n, 2, 64, 64) and saved.dtype == mx.float32
    # The option changes nothing else.
    assert np.array_equal(to_numpy(y), to_numpy(y0)) and np.array_equal(to_numpy(s), to_numpy(s0))
    _, _, states = delta_rule_steps(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    ref = states[:, [64 * E * (i + 1) - 1 for i in range(n)]]
    err = rel_error(to_numpy(saved), ref)
    tol = TOLERANCE[DT[dtype]]
    assert err < tol, f"saved states err {err:.2e} (tol {tol}), T={T} E={E} {dtype} {gate}, seed={seed}"
