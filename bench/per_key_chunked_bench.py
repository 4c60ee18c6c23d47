"""Per-key gates: the chunked kernels against the recurrent kernel, one layer's call.

    python bench/per_key_chunked_bench.py [--backend cuda] [--out FILE.json] [--quick]

Kimi-like shapes (Hk = Hv = 32, Dk = Dv = 128, bf16), per-key gates precomputed (g [B,T,Hv,Dk])
and fused (a [B,T,Hv,Dk], A_log [Hv,1], dt_bias [Hv,Dk], lower_bound -5), B in (1, 4), T in
(1024, 4096): algorithm="recurrent" and algorithm="chunked" on the chosen backend, in turns.
Each path is checked against the float64 reference on a small case before anything is timed.
Median wall time per call, synchronised after each call (mlx_gdn.bench.timing). The answer
decides whether `backends.prefers_chunked` may take per-key gates (it refuses them until a
chunked kernel is measured faster than the recurrent one at T=4096).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_gdn  # noqa: E402
from mlx_gdn.bench.timing import mlx_sync, time_calls  # noqa: E402
from mlx_gdn.reference import delta_rule, gates, rel_error  # noqa: E402
from mlx_gdn.testing import random_inputs  # noqa: E402

H, D = 32, 128
LB = -5.0


def _call(x, fused, backend, algorithm):
    if fused:
        return mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log.reshape(-1, 1), x.dt_bias, x.state,
                                          lower_bound=LB, backend=backend, algorithm=algorithm)
    return mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, backend=backend, algorithm=algorithm)


def _inputs(B, T, fused, seed):
    return random_inputs(B, T, H, H, D, D, dtype=mx.bfloat16, seed=seed, gate="key",
                         fused_gate="key" if fused else "scalar")


def _check(fused, backend, algorithm):
    """The path being timed agrees with the float64 reference on a small case first."""
    x = _inputs(1, 150, fused, 1)
    y, s = _call(x, fused, backend, algorithm)
    if fused:
        g, beta = gates(x.a, x.b, x.A_log, x.dt_bias, LB)
    else:
        g, beta = x.g, x.beta
    yr, sr = delta_rule(x.q, x.k, x.v, g, beta, x.state)
    err = max(rel_error(y, yr), rel_error(s, sr))
    assert err < 2e-2, f"fused={fused} {algorithm}: relative error {err:.2e}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=2.0)
    opts = ap.parse_args()
    algos = ("recurrent", "chunked")
    for fused in (False, True):
        for algo in algos:
            _check(fused, opts.backend, algo)
    cells = [(1, 1024), (1, 4096), (4, 4096)] if not opts.quick else [(1, 256)]
    rows = []
    for B, T in cells:
        for fused in (False, True):
            xs = [_inputs(B, T, fused, s) for s in range(2)]
            mx.eval([a for x in xs for a in (x.q, x.k, x.v, x.g, x.beta, x.a, x.b, x.state)])
            for algo in algos:
                fns = [lambda x=x: _call(x, fused, opts.backend, algo) for x in xs]
                r = time_calls(fns, mlx_sync, budget=opts.budget)
                row = dict(B=B, T=T, fused=fused, algorithm=algo, median_ms=1e3 * r["median_s"], reps=r["reps"])
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = dict(device=str(mx.default_device()), mlx=mx.__version__, platform=platform.platform(), H=H, D=D,
               dtype="bfloat16", backend=opts.backend, rows=rows)
    if opts.out:
        Path(opts.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
