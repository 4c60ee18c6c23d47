"""Host-side cost of one public call: validation, dispatch, argument assembly, without any kernel.

The backend's kernel launch is replaced by a stub returning its inputs, so what is timed is the
Python work a decode step pays on top of the kernel. Usage:
    PYTHONPATH=. python bench/api_overhead.py [--reps N]
"""

import argparse
import statistics
import time

import mlx.core as mx

import mlx_gdn
from mlx_gdn import ops_backend
from mlx_gdn.testing import random_inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20000)
    args = ap.parse_args()
    x = random_inputs(1, 1, 16, 32, 128, 128, seed=0, dtype=mx.bfloat16)
    mx.eval(x.q, x.k, x.v, x.a, x.b, x.state)
    ops_backend.run = lambda p, q, k, v, state, mask, **kw: (v, state)  # no kernel: host work only
    call = lambda: mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, backend="ops")  # noqa: E731
    for _ in range(1000):
        call()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(args.reps):
            call()
        rounds.append((time.perf_counter() - t) / args.reps * 1e6)
    print(f"gated_delta_update host overhead, B=1 T=1 Qwen3.5 shape: median {statistics.median(rounds):.1f} us "
          f"(rounds: {', '.join(f'{r:.1f}' for r in rounds)})")


if __name__ == "__main__":
    main()
