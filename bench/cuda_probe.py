"""Where the time of a CUDA call goes (run on the GPU machine; no fla needed).

    PYTHONUNBUFFERED=1 python bench/cuda_probe.py --out DIR [--only decode|chunked]

decode: a ladder from MLX's cheapest launch to the public call, B=1 and B=16, bf16, Qwen3.5
shape. Each rung adds one thing: the decode's inputs and outputs on a trivial body; the real
header text on that trivial body; the real kernel object; the package's launcher; the public
call; then the graph-building part alone (no evaluation), and the GPU time per step from a
chain of steps evaluated once.
chunked: the two launches of the chunked path alone and together, T=4096, B=1 and 4, per BV.
Method as bench/cuda_bench.py: evaluation + synchronise after each call, median.
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
from mlx_gdn import cuda, launch  # noqa: E402
from mlx_gdn.gating import FusedGating  # noqa: E402
from mlx_gdn.testing import random_inputs  # noqa: E402
from mlx_gdn.validate import check_update  # noqa: E402

HK, HV, D = 16, 32, 128
ROWS = []


def wall_ms(call, sets, warm=5, reps=300, max_s=3.0):
    for i in range(warm):
        call(sets[i % len(sets)])
        mx.synchronize()
    times = []
    t_end = time.perf_counter() + max_s
    for i in range(reps):
        s = sets[i % len(sets)]
        t0 = time.perf_counter()
        call(s)
        mx.synchronize()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end and len(times) >= 5:
            break
    return 1e3 * statistics.median(times)


def record(name, ms, **kw):
    ROWS.append(dict(probe=name, ms=round(ms, 4), **kw))
    print(f"{name:44s} {kw} {ms:9.4f} ms", flush=True)


def sets_for(B, T, n=3):
    out = [random_inputs(B, T, HK, HV, D, D, dtype=mx.bfloat16, seed=2000 + i) for i in range(n)]
    for x in out:
        mx.eval(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state)
    return out


def decode_ladder(B):
    sets = sets_for(B, 1)
    x0 = sets[0]
    p = check_update(x0.q, x0.k, x0.v, x0.a, x0.b, x0.A_log, x0.dt_bias, x0.state, None, None, False)
    spec = launch.recurrent_spec(p)
    arrays = [launch.recurrent_inputs(x.q, x.k, x.v, x.state, None,
                                                  gating=FusedGating(x.a, x.b, x.A_log, x.dt_bias)) for x in sets]
    kw = dict(template=list(spec.template), grid=spec.grid, threadgroup=spec.threadgroup,
              output_shapes=list(spec.output_shapes), output_dtypes=list(spec.output_dtypes))
    tiny = "if (threadIdx.x == 0 && blockIdx.x == 0) { y[0] = q[0]; state_out[0] = state_in[0]; }"

    one = mx.fast.cuda_kernel(name="probe_one", input_names=["x"], output_names=["o"],
                              source="if (threadIdx.x == 0 && blockIdx.x == 0) o[0] = x[0];")
    xs = [mx.ones((4,)) for _ in range(3)]
    mx.eval(xs)
    record("trivial 1 in / 1 out", wall_ms(lambda x: mx.eval(one(
        inputs=[x], output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(32, 1, 1), threadgroup=(32, 1, 1))[0]), xs), B=B)

    io = mx.fast.cuda_kernel(name="probe_io", input_names=list(spec.input_names), output_names=["y", "state_out"],
                             source=tiny)
    record("trivial body, decode's inputs/outputs", wall_ms(lambda a: mx.eval(*io(inputs=a, **kw)), arrays), B=B)
    from mlx_gdn.kernel_source import load
    for what, header in (("compacted", cuda.recurrent_header(spec)), ("as written", load(cuda.PRELUDE) + spec.header())):
        io_long = mx.fast.cuda_kernel(name="probe_io_long", input_names=list(spec.input_names),
                                      output_names=["y", "state_out"], source=tiny, header=header)
        record(f"same + decode header text {what}", wall_ms(lambda a: mx.eval(*io_long(inputs=a, **kw)), arrays),
               B=B, header_chars=len(header))

    kern = cuda.kernel_for_spec(spec)
    record("decode kernel object", wall_ms(lambda a: mx.eval(*kern(inputs=a, **kw)), arrays), B=B,
           source_chars=len(cuda.recurrent_header(spec)) + len(spec.source()))
    record("decode kernel object, eval state only", wall_ms(lambda a: mx.eval(kern(inputs=a, **kw)[1]), arrays), B=B)

    def run_direct(x):
        mx.eval(*cuda.run_recurrent(p, x.q, x.k, x.v, x.state, None, gating=FusedGating(x.a, x.b, x.A_log, x.dt_bias))
    record("cuda.run_recurrent", wall_ms(run_direct, sets), B=B)

    def api(x):
        mx.eval(*mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, backend="cuda"))
    record("public gated_delta_update", wall_ms(api, sets), B=B)

    # host-only part: build the graph, no evaluation (timed per call over many calls)
    for name, fn in (("graph build only: kernel object", lambda a: kern(inputs=a, **kw)),
                     ("graph build only: public call",
                      lambda x: mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state,
                                                           backend="cuda"))):
        src = arrays if "object" in name else sets
        t = []
        for i in range(2000):
            t0 = time.perf_counter()
            fn(src[i % 3])
            t.append(time.perf_counter() - t0)
        record(name, 1e3 * statistics.median(t), B=B)

    # GPU time per step: a chain of steps (state feeds the next), evaluated once
    n = 64
    def chain(a):
        st = a[spec.input_names.index("state_in")]
        ins = list(a)
        for _ in range(n):
            ins[spec.input_names.index("state_in")] = st
            _, st = kern(inputs=ins, **kw)
        mx.eval(st)
    ms = wall_ms(chain, arrays, warm=2, reps=20)
    record(f"chain of {n} decode launches, per launch", ms / n, B=B)
    st_bytes = 2 * B * HV * D * D * 4
    ROWS[-1]["state_GBps_if_gpu_bound"] = round(st_bytes / (ms / n * 1e-3) / 1e9, 1)


def chunked_split(B, T=4096):
    sets = sets_for(B, T, n=2)
    for bv in (None, 16, 32, 64):
        cuda.CHUNK_BV = bv
        def full(x):
            mx.eval(*mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state,
                                                backend="cuda", algorithm="chunked"))
        record("chunked full call", wall_ms(full, sets, reps=60), B=B, T=T, BV=bv)
    cuda.CHUNK_BV = None
    # prep alone: evaluate only the prep outputs (the state pass is not in the graph)
    captured = {}
    real = cuda._kernel

    def spy(kname, *a, **k):
        kern = real(kname, *a, **k)
        def call(**kw):
            outs = kern(**kw)
            captured[kname] = (kern, kw, outs)
            return outs
        return call
    cuda._kernel = spy
    x = sets[0]
    mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, backend="cuda", algorithm="chunked")
    cuda._kernel = real
    pk, pkw, _ = captured["gdn_cuda_chunked_prep"]
    record("chunked prep launch alone", wall_ms(lambda _: mx.eval(*pk(**pkw)), [0], reps=60), B=B, T=T)
    sk, skw, _ = captured["gdn_cuda_chunked_state"]
    ins = skw["inputs"]
    mx.eval(*ins)
    record("chunked state launch alone", wall_ms(lambda _: mx.eval(*sk(**skw)), [0], reps=60), B=B, T=T,
           BV=skw["template"][2][1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--only", choices=("decode", "chunked"), default=None)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = dict(mlx=mx.__version__, commit=os.environ.get("GDN_COMMIT", "?"),
               command="PYTHONUNBUFFERED=1 python bench/cuda_probe.py --out $OUT")
    print(env, flush=True)
    if args.only in (None, "decode"):
        for B in (1, 16):
            decode_ladder(B)
    if args.only in (None, "chunked"):
        for B in (1, 4):
            chunked_split(B)
    with open(os.path.join(args.out, "cuda_probe.json"), "w") as f:
        json.dump(dict(env=env, rows=ROWS), f, indent=1)


if __name__ == "__main__":
    main()
