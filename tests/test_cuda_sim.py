"""The CUDA tensor-core kernels (kernels/chunked_tc.cuh) on the CPU, through the simulator.

`mlx_gdn.sim.simulated_cuda()` compiles the same kernel text as the GPU gets, with CPU meanings
for blocks, warps, shared memory, mma.sync, ldmatrix and cp.async (mlx_gdn/sim/cuda_vocab.h).
So the chunked CUDA path is checked against the float64 reference on every commit, with the GPU
tests' cases and tolerances (tests/test_cuda.py); the GPU run remains the check of the hardware
itself (its instruction timing, asynchronous copies in flight, real fragment arithmetic).
"""

from __future__ import annotations

import pytest

from mlx_gdn import cuda
from mlx_gdn.sim import SimError, simulated_cuda

from cuda_cases import CHUNKED, CHUNKED_REGS, check_case


@pytest.fixture(autouse=True)
def in_simulator():
    with simulated_cuda():
        yield


@pytest.mark.parametrize("case", CHUNKED, ids=lambda c: "-".join(map(str, c)))
def test_chunked(case):
    B, T, Hk, Hv, Dk, Dv, dt, masked, fused, lb, neg = case
    check_case("chunked", B, T, Hk, Hv, Dk, Dv, dt, "scalar", masked, fused, lb, neg)


@pytest.mark.parametrize("bv", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_chunked_state_slice_widths(bv, dtype, monkeypatch):
    """Every value-slice width of the state launch (128 runs 8 warps, two per token strip)."""
    monkeypatch.setattr(cuda, "CHUNK_BV", bv)
    check_case("chunked", 2, 150, 2, 4, 128, 128, dtype, "scalar", True, True, None, False)


@pytest.mark.parametrize("case", CHUNKED_REGS, ids=lambda c: "-".join(map(str, c)))
def test_chunked_state_in_registers(case, monkeypatch):
    """The state pass with S in registers (cuda.STATE_REGS) on the chunked cases it takes."""
    from mlx_gdn import cuda

    monkeypatch.setattr(cuda, "STATE_REGS", True)
    B, T, Hk, Hv, Dk, Dv, dt, masked, fused, lb, neg = case
    check_case("chunked", B, T, Hk, Hv, Dk, Dv, dt, "scalar", masked, fused, lb, neg)


@pytest.mark.parametrize("nw", [1, 2, 4, 8])
def test_chunked_state_in_registers_warps(nw, monkeypatch):
    """Every block width of the register-state pass (16 value rows per warp)."""
    from mlx_gdn import cuda

    monkeypatch.setattr(cuda, "STATE_REGS", True)
    monkeypatch.setattr(cuda, "STATE_REGS_NW", nw)
    check_case("chunked", 2, 150, 2, 4, 64, 128, "bf16", "scalar", True, True, None, False)


@pytest.mark.parametrize("decay", ["one", "slow"])
def test_decay_extremes(decay):
    check_case("chunked", 1, 140, 1, 2, 128, 128, "f32", decay=decay)


def test_metal_vocabulary_bodies_are_refused():
    """The recurrent bodies reach CUDA through the Metal-vocabulary prelude; the CUDA simulator
    does not take them (simulated_metal() runs those bodies) and says so."""
    from mlx_gdn import launch
    from mlx_gdn.validate import Problem
    import mlx.core as mx

    spec = launch.recurrent_spec(Problem(1, 1, 1, 2, 64, 64, mx.float32, "scalar", False, False))
    with pytest.raises(SimError, match="simulated_metal"):
        cuda.kernel_for_spec(spec)
