"""The CUDA tensor-core kernels (kernels/chunked/*.cuh) on the CPU, through the simulator.

`mlx_gdn.sim.simulated_cuda()` compiles the same kernel text as the GPU gets, with CPU meanings
for blocks, warps, shared memory, mma.sync, ldmatrix and cp.async (mlx_gdn/sim/cuda_vocab.h).
So the chunked CUDA path is checked against the float64 reference on every commit, with the GPU
tests' cases and tolerances (tests/test_cuda.py); the GPU run remains the check of the hardware
itself (its instruction timing, asynchronous copies in flight, real fragment arithmetic).
"""

from __future__ import annotations

import pytest

from mlx_gdn.cuda import kernel as cuda
from mlx_gdn.sim import SimError, simulated_cuda

from cuda_cases import check_case
from cuda_cases import (  # noqa: F401  (collected here: the chunked tests, run in the simulator)
    test_chunked,
    test_chunked_exact_zero_gates,
    test_chunked_key,
    test_chunked_key_gates_near_zero_and_one,
    test_chunked_state_in_registers,
    test_chunked_state_in_registers_warps,
    test_chunked_state_slice_widths,
)


@pytest.fixture(autouse=True)
def in_simulator():
    with simulated_cuda():
        yield


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


def test_writes_outside_a_buffer_are_reported():
    """CUDA kernels get plain pointers; a write past a buffer's end lands in a guard and is
    reported, while in-bounds results come back unchanged."""
    import mlx.core as mx
    import numpy as np

    from mlx_gdn.sim import SimOutOfBoundsError

    body = "int i = threadIdx.x; o[i] = x[i] * 2.0f; if (OOB && i == 0) o[64] = 1.0f;"
    kern = mx.fast.cuda_kernel(name="guarded", input_names=["x"], output_names=["o"], source=body)

    def run(oob):
        return kern(inputs=[mx.arange(64).astype(mx.float32)], template=[("OOB", oob)], output_shapes=[(64,)],
                    output_dtypes=[mx.float32], grid=(64, 1, 1), threadgroup=(64, 1, 1))[0]

    assert np.array_equal(np.array(run(False)), 2 * np.arange(64, dtype=np.float32))
    with pytest.raises(SimOutOfBoundsError, match="outside buffer 'o'"):
        run(True)
