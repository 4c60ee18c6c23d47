"""Where a call's wall time goes on the GPU machine: building the graph, launching it, waiting.

    PYTHONUNBUFFERED=1 python bench/cuda_host_split.py --out DIR

Each call is split into three host-clock intervals: the Python call that builds MLX's graph
(`build`), `mx.async_eval` of its outputs (`launch`: MLX encodes the kernels and submits them),
and `mx.synchronize()` (`wait`: what the GPU still had to do after the host returned). With
`bench/cuda_kernel_times.py`'s GPU time per kernel this says whether a shape is bound by the
host or by the GPU, and where in the host. Also recorded: MLX's cache and peak memory, which say
whether large outputs come from MLX's buffer cache or a fresh allocation on each call.
Shapes: bf16, Hk=16, Hv=32, Dk=Dv=128 (the benchmark's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mlx_gdn  # noqa: E402
from mlx_gdn import cuda  # noqa: E402

import cuda_bench  # noqa: E402  (bench/, this script's folder)

ROWS = []


def split_us(build, sets, reps=200, warm=5, wait="async"):
    """Median (build, launch, wait, total) microseconds over `reps` calls; inputs rotated.

    wait: "async" = mx.async_eval then mx.synchronize (launch is the async_eval);
    "eval" = mx.eval then mx.synchronize (the benchmarks' method before a44e28f; launch then holds
    the eval's wait)."""
    for i in range(warm):
        mx.eval(build(sets[i % len(sets)]))
        mx.synchronize()
    go = mx.async_eval if wait == "async" else mx.eval
    parts = []
    for i in range(reps):
        s = sets[i % len(sets)]
        t0 = time.perf_counter()
        outs = build(s)
        t1 = time.perf_counter()
        go(outs)
        t2 = time.perf_counter()
        mx.synchronize()
        t3 = time.perf_counter()
        parts.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    return [round(1e6 * statistics.median(p[k] for p in parts), 1) for k in range(4)]


def record(case, build, sets, reps, wait="async", **kw):
    mx.reset_peak_memory()
    b, la, w, tot = split_us(build, sets, reps, wait=wait)
    kw = dict(wait=wait, **kw)
    row = dict(case=case, build_us=b, launch_us=la, wait_us=w, total_us=tot,
               cache_MB=round(mx.get_cache_memory() / 1e6, 1), peak_MB=round(mx.get_peak_memory() / 1e6, 1), **kw)
    ROWS.append(row)
    print(f"{case:46s} {kw} build {b:7.1f}  launch {la:7.1f}  wait {w:7.1f}  total {tot:7.1f} us"
          f"  cache {row['cache_MB']} MB peak {row['peak_MB']} MB", flush=True)


def compiled_launch(sets, reps, shape):
    """The decode kernel object called bare, and through mx.compile: what graph building costs
    without the package's Python, and whether a compiled launch removes MLX's per-call source work.
    (Launching the package's calls through mx.compile was tried at 284a83c-6794fc7 and measured
    no faster in alternating rounds, bench/cuda_compile_ab_6794fc7.json; it was taken out.)"""
    from mlx_gdn import launch

    seen = []
    orig = launch.recurrent_launcher

    def spy(*a):
        out = orig(*a)
        seen.append(out)
        return out

    x = sets[0]
    launch.recurrent_launcher = spy
    try:
        mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, backend="cuda")
    finally:
        launch.recurrent_launcher = orig
    spec, kern, kw = seen[-1]
    print("decode inputs", spec.input_names, flush=True)

    def bare(x):
        return kern(inputs=[x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state], **kw)

    record("decode kernel object, bare call", bare, sets, reps, **shape)
    try:
        fn = mx.compile(lambda *ins: kern(inputs=list(ins), **kw))
        ref = bare(x)
        got = fn(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state)
        mx.eval(ref, got)
        same = all(bool(mx.array_equal(r, g)) for r, g in zip(ref, got))
        print("compiled launch equals bare:", same, flush=True)
        record("decode kernel object, mx.compile", lambda x: fn(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias,
                                                                 x.state), sets, reps, same=same, **shape)
    except Exception as e:
        print("mx.compile of the kernel call failed:", type(e).__name__, e, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = dict(mlx=mx.__version__, commit=os.environ.get("GDN_COMMIT", "?"),
               command="PYTHONUNBUFFERED=1 python bench/cuda_host_split.py --out $OUT")
    print(env, flush=True)

    one = mx.fast.cuda_kernel(name="split_one", input_names=["x"], output_names=["o"],
                              source="if (threadIdx.x == 0 && blockIdx.x == 0) o[0] = x[0];")
    xs = [mx.ones((4,))]
    mx.eval(xs)

    def trivial(x):
        return one(inputs=[x], output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(32, 1, 1),
                   threadgroup=(32, 1, 1))

    for wait in ("async", "eval"):
        record("MLX trivial kernel", trivial, xs, 500, wait=wait)

    def public(x):
        return mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, backend="cuda")

    for B, T, reps in ((1, 1, 500), (16, 1, 300), (1, 4096, 60), (2, 4096, 50), (4, 4096, 40)):
        sets = cuda_bench.make_mlx_sets(B, T, mx.bfloat16, n=2)
        for x in sets:
            mx.eval(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state)
        shape = dict(B=B, T=T)
        cuda.STATE_REGS = False  # chunked: the shared-memory state pass first
        for wait in ("async", "eval"):
            record("gated_delta_update", public, sets, reps, wait=wait, **shape)
        cuda.STATE_REGS = None
        if T == 1:
            record("MLX state copy (x * 1)", lambda x: x.state * 1.0, sets, reps, **shape)
            compiled_launch(sets, reps, shape)
        else:
            cuda.STATE_REGS = True
            for nw in (None, 4, 8) if B == 2 else (None,):
                cuda.STATE_REGS_NW = nw
                record(f"gated_delta_update, state in registers, warps {nw or 'auto'}", public, sets, reps, **shape)
            cuda.STATE_REGS, cuda.STATE_REGS_NW = None, None
        del sets
    record("MLX trivial kernel (again)", trivial, xs, 500)

    with open(os.path.join(args.out, "cuda_host_split.json"), "w") as f:
        json.dump(dict(env=env, rows=ROWS), f, indent=1)


if __name__ == "__main__":
    main()
