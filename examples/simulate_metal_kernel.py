"""Run your own `mx.fast.metal_kernel` on a machine without an Apple GPU, and see bugs caught.

The kernel below is written as for any MLX project: one threadgroup per row of a matrix, each
simdgroup sums its part of the row with `simd_sum`, the simdgroups meet in threadgroup memory
after a barrier, and every thread writes its element divided by the row's sum. Nothing in it
knows about the simulator; `with simulated_metal():` is the only change.

Then two deliberate bugs: a write past the end of the output (reported with the buffer's name
and the index) and an element the kernel forgets to write (NaN, as every output starts).

    python examples/simulate_metal_kernel.py [--rows 6] [--cols 200]
"""

import argparse

import mlx.core as mx
import numpy as np

from mlx_gdn.sim import SimOutOfBoundsError, simulated_metal

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=6)
ap.add_argument("--cols", type=int, default=200)
args = ap.parse_args()

THREADS = 128  # per threadgroup: four simdgroups of 32

SOURCE = """
    uint row = threadgroup_position_in_grid.y;
    uint t = thread_position_in_threadgroup.x;
    uint n = x_shape[1];
    threadgroup float partial[N_SIMD];

    float s = 0.0f;
    for (uint j = t; j < n; j += THREADS) s += x[row * n + j];
    s = simd_sum(s);                                   // lanes of one simdgroup, in lockstep
    if (thread_index_in_simdgroup == 0) partial[simdgroup_index_in_threadgroup] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);   // every simdgroup's partial sum is written
    float total = 0.0f;
    for (uint i = 0; i < N_SIMD; ++i) total += partial[i];

    for (uint j = t; j < n + EXTRA; j += THREADS) {
        if (SKIP_LAST && j == n - 1) continue;
        out[row * n + j] = x[row * n + min(j, n - 1)] / total;
    }
"""


def normalize_rows(x: mx.array, extra: int = 0, skip_last: bool = False) -> mx.array:
    """Each row of x [rows, cols] float32 divided by its sum; `extra` and `skip_last` plant bugs."""
    kernel = mx.fast.metal_kernel(name="normalize_rows", input_names=["x"], output_names=["out"], source=SOURCE)
    return kernel(
        inputs=[x],
        template=[("THREADS", THREADS), ("N_SIMD", THREADS // 32), ("EXTRA", extra), ("SKIP_LAST", skip_last)],
        grid=(THREADS, x.shape[0], 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[mx.float32],
    )[0]


rng = np.random.default_rng(0)
x_np = rng.uniform(0.5, 1.5, (args.rows, args.cols)).astype(np.float32)
want = x_np / x_np.sum(1, keepdims=True)

with simulated_metal():
    got = np.array(normalize_rows(mx.array(x_np)))
    err = float(np.abs(got - want).max())
    print(f"normalize_rows in the simulator: max abs error {err:.2e}")
    ok = err < 1e-6

    try:  # a loop bound past the row's end: each row writes into the next one, the last past the buffer
        np.array(normalize_rows(mx.array(x_np), extra=THREADS))
        print("out-of-bounds write NOT reported")
        ok = False
    except SimOutOfBoundsError as e:
        print("out-of-bounds write reported:", str(e).splitlines()[0])

    forgot = np.array(normalize_rows(mx.array(x_np), skip_last=True))
    poisoned = np.isnan(forgot[:, -1]).all() and np.isfinite(forgot[:, :-1]).all()
    print(f"forgotten element is NaN in every row: {poisoned}")
    ok = ok and poisoned

print("CHECK", "ok" if ok else "FAILED")
raise SystemExit(0 if ok else 1)
