"""Host-side cost of one public call: validation, dispatch, argument assembly, without any kernel.

The kernel is replaced by a stub returning existing arrays, so what is timed is the Python work a
decode step pays on top of MLX's own launch. Usage:
    PYTHONPATH=. python bench/api_overhead.py [--reps N] [--path ops|cuda]

--path ops stubs the ops backend's `run` (validation and dispatch only); --path cuda pretends a
CUDA device is present and stubs `mx.fast.cuda_kernel`'s kernel object, so the CUDA launcher's
own work (launch spec, argument lists) is timed too.
"""

import argparse
import statistics
import time

import mlx.core as mx

import mlx_gdn
from mlx_gdn import cuda, ops_backend
from mlx_gdn.testing import random_inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20000)
    ap.add_argument("--path", choices=("ops", "cuda"), default="cuda")
    args = ap.parse_args()
    x = random_inputs(1, 1, 16, 32, 128, 128, seed=0, dtype=mx.bfloat16)
    mx.eval(x.q, x.k, x.v, x.a, x.b, x.state)
    if args.path == "ops":
        ops_backend.run = lambda p, q, k, v, state, mask, **kw: (v, state)  # no kernel: host work only
    else:
        outs = [x.v, x.state]
        cuda.available = lambda: True
        mx.fast.cuda_kernel = lambda **kw: (lambda **call: outs)
    call = lambda: mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state,  # noqa: E731
                                              backend=args.path)
    for _ in range(1000):
        call()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(args.reps):
            call()
        rounds.append((time.perf_counter() - t) / args.reps * 1e6)
    print(f"gated_delta_update host overhead (--path {args.path}), B=1 T=1 Qwen3.5 shape: median "
          f"{statistics.median(rounds):.1f} us (rounds: {', '.join(f'{r:.1f}' for r in rounds)})")


if __name__ == "__main__":
    main()
