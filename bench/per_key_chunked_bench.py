"""Per-key gates: the chunked kernels against the recurrent kernel, one layer's call.

    python bench/per_key_chunked_bench.py [--backend cuda] [--out FILE.json] [--quick]

Qwen3.5's head shape (Hk = 16, Hv = 32, Dk = Dv = 128, bf16) with per-key gates, precomputed
(g [B,T,Hv,Dk]) and fused (a [B,T,Hv,Dk], A_log [Hv,1], dt_bias [Hv,Dk], lower_bound -5), B in
(1, 4), T in (1024, 4096, 8192): algorithm="recurrent" and algorithm="chunked" on the chosen
backend. Each path is checked against the float64 reference on a small case before anything is
timed. Per cell: median wall time per call, synchronised after each call (mlx_gdn.bench.timing),
and, where CUPTI is reachable (NVIDIA GPU, torch importable: mlx_gdn.bench.gpu_time), GPU time
per call and kernels per call; the chunked/recurrent ratio of each follows the rows. The answer
decides whether `backends.prefers_chunked` may take per-key gates (it refuses them until a
chunked kernel is measured faster than the recurrent one at T=4096).

--backend ops (or any backend the machine has) with --quick is the CPU smoke test: one small
cell, wall time only. The timed inputs are drawn on the device (`_timed_inputs`); the checked
case is drawn as the tests draw theirs.
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
from mlx_gdn.bench import gpu_time  # noqa: E402
from mlx_gdn.bench.timing import mlx_sync, time_calls  # noqa: E402
from mlx_gdn.gating import normalize_qk  # noqa: E402
from mlx_gdn.reference import delta_rule, gates, rel_error  # noqa: E402
from mlx_gdn.testing import Inputs, random_inputs  # noqa: E402

HK, HV, D = 16, 32, 128  # Qwen3.5's linear-attention heads
LB = -5.0
ALGORITHMS = ("recurrent", "chunked")
CELLS = [(B, T) for T in (1024, 4096, 8192) for B in (1, 4)]
QUICK_CELLS = [(1, 256)]


def _call(x, fused, backend, algorithm):
    if fused:
        return mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log.reshape(-1, 1), x.dt_bias, x.state,
                                          lower_bound=LB, backend=backend, algorithm=algorithm)
    return mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, backend=backend, algorithm=algorithm)


def _inputs(B, T, fused, seed):
    """The small checked case's inputs (NumPy-seeded, as the tests draw them)."""
    return random_inputs(B, T, HK, HV, D, D, dtype=mx.bfloat16, seed=seed, gate="key",
                         fused_gate="key" if fused else "scalar")


def _timed_inputs(B, T, seed):
    """The timed cells' inputs, drawn on the default device (per-key arrays of B * T * Hv * Dk
    elements take seconds each in NumPy at B=4, T=8192): q, k normalised; per-key g mixed as
    `random_inputs` draws it (mostly (0.05, 1), a tenth near 0, a tenth exactly 1); a, dt_bias
    per key column; bf16, state float32."""
    key = mx.random.key(seed)
    ks = mx.random.split(key, 9)
    n = lambda k, *s: mx.random.normal(s, key=k)  # noqa: E731
    gshape = (B, T, HV, D)
    q, k = normalize_qk(n(ks[0], B, T, HK, D), n(ks[1], B, T, HK, D))
    pick = mx.random.uniform(shape=gshape, key=ks[2])
    g = mx.where(pick < 0.1, mx.random.uniform(1e-6, 1e-2, gshape, key=ks[3]),
                 mx.where(pick > 0.9, 1.0, mx.random.uniform(0.05, 1.0, gshape, key=ks[4])))
    bf = lambda x: x.astype(mx.bfloat16)  # noqa: E731
    return Inputs(bf(q), bf(k), bf(n(ks[5], B, T, HV, D)), bf(g), bf(mx.random.uniform(shape=(B, T, HV), key=ks[6])),
                  bf(2.0 * n(ks[7], *gshape)), bf(2.0 * n(ks[8], B, T, HV)),
                  mx.log(mx.random.uniform(0.5, 16.0, (HV,), key=ks[0])), n(ks[1], HV, D),
                  0.1 * n(ks[2], B, HV, D, D), None)


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


def _ratios(rows):
    """chunked / recurrent per (B, T, fused), wall and GPU time (GPU: None without CUPTI)."""
    by = {(r["B"], r["T"], r["fused"], r["algorithm"]): r for r in rows}
    out = []
    for (B, T, fused, algo), rec in by.items():
        ch = by.get((B, T, fused, "chunked"))
        if algo != "recurrent" or ch is None:
            continue
        gpu = None
        if rec["gpu_us"] is not None and ch["gpu_us"] is not None:
            gpu = ch["gpu_us"] / rec["gpu_us"]
        out.append(dict(B=B, T=T, fused=fused, wall_chunked_over_recurrent=ch["median_ms"] / rec["median_ms"],
                        gpu_chunked_over_recurrent=gpu))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="one small cell (the CPU smoke test)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of wall-time calls per cell and path")
    opts = ap.parse_args()
    for fused in (False, True):
        for algo in ALGORITHMS:
            _check(fused, opts.backend, algo)
    cupti = gpu_time.available()
    rows = []
    for B, T in QUICK_CELLS if opts.quick else CELLS:
        for fused in (False, True):
            xs = [_timed_inputs(B, T, s) for s in range(2)]
            mx.eval([a for x in xs for a in (x.q, x.k, x.v, x.g, x.beta, x.a, x.b, x.A_log, x.dt_bias, x.state)])
            for algo in ALGORITHMS:
                fns = [lambda x=x, algo=algo, fused=fused: _call(x, fused, opts.backend, algo) for x in xs]
                r = time_calls(fns, mlx_sync, budget=opts.budget)
                g = gpu_time.kernel_times(fns, mlx_sync, reps=max(3, min(20, r["reps"]))) if cupti else None
                row = dict(B=B, T=T, fused=fused, algorithm=algo, median_ms=1e3 * r["median_s"], reps=r["reps"],
                           gpu_us=None if g is None else g["gpu_us"],
                           launches=None if g is None else g["launches"],
                           kernels=None if g is None else g["kernels"])
                print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
                rows.append(row)
            del xs
    ratios = _ratios(rows)
    for r in ratios:
        print(json.dumps(r), flush=True)
    out = dict(device=str(mx.default_device()), mlx=mx.__version__, platform=platform.platform(), Hk=HK, Hv=HV, D=D,
               dtype="bfloat16", lower_bound=LB, backend=opts.backend, gpu_time="CUPTI" if cupti else None,
               rows=rows, chunked_over_recurrent=ratios)
    if opts.out:
        Path(opts.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
