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

import cuda_bench  # noqa: E402  (bench/, this script's folder)

HK, HV, D = 16, 32, 128
ROWS = []


def wall_ms(call, sets, warm=5, reps=300, max_s=3.0):
    """Median ms per call, as bench/cuda_bench.py times (evaluation + synchronise after each)."""
    return cuda_bench.wall_ms(call, mx.synchronize, sets, warm=warm, reps=reps, max_s=max_s)[0]


def record(name, ms, **kw):
    ROWS.append(dict(probe=name, ms=round(ms, 4), **kw))
    print(f"{name:44s} {kw} {ms:9.4f} ms", flush=True)


def sets_for(B, T, n=3):
    out = [random_inputs(B, T, HK, HV, D, D, dtype=mx.bfloat16, seed=2000 + i) for i in range(n)]
    for x in out:
        mx.eval(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state)
    return out


def interleaved_ms(variants, reps=400, warm=5):
    """Median ms per variant, timed round-robin (one call of each in turn) so that a host whose
    speed drifts during the run shifts every variant alike."""
    for name, fn, data in variants:
        for i in range(warm):
            fn(data[i % len(data)])
            mx.synchronize()
    times = {name: [] for name, _, _ in variants}
    for i in range(reps):
        for name, fn, data in variants:
            t0 = time.perf_counter()
            fn(data[i % len(data)])
            mx.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def decode_ladder(B):
    sets = sets_for(B, 1)
    x0 = sets[0]
    p = check_update(x0.q, x0.k, x0.v, x0.a, x0.b, x0.A_log, x0.dt_bias, x0.state, None, None, False)
    spec = launch.recurrent_spec(p)
    arrays = [launch.recurrent_inputs(x.q, x.k, x.v, x.state, None, gating=FusedGating(x.a, x.b, x.A_log, x.dt_bias))
              for x in sets]
    kw = spec.call_kwargs()
    tiny = "if (threadIdx.x == 0 && blockIdx.x == 0) { y[0] = q[0]; state_out[0] = state_in[0]; }"
    one = mx.fast.cuda_kernel(name="probe_one", input_names=["x"], output_names=["o"],
                              source="if (threadIdx.x == 0 && blockIdx.x == 0) o[0] = x[0];")
    xs = [mx.ones((4,)) for _ in range(3)]
    mx.eval(xs)
    io = mx.fast.cuda_kernel(name="probe_io", input_names=list(spec.input_names), output_names=["y", "state_out"],
                             source=tiny, header=cuda.recurrent_header(spec))
    kern = cuda.kernel_for_spec(spec)

    def api(x):
        mx.eval(*mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, backend="cuda"))

    variants = [
        ("trivial kernel, 1 in / 1 out", lambda x: mx.eval(one(inputs=[x], output_shapes=[(1,)], output_dtypes=[mx.float32],
                                                                grid=(32, 1, 1), threadgroup=(32, 1, 1))[0]), xs),
        ("trivial body, decode's header, inputs and outputs", lambda a: mx.eval(*io(inputs=a, **kw)), arrays),
        ("decode kernel object", lambda a: mx.eval(*kern(inputs=a, **kw)), arrays),
        ("public gated_delta_update", api, sets),
        ("decode kernel object (second in the rotation)", lambda a: mx.eval(*kern(inputs=a, **kw)), arrays),
        ("public gated_delta_update (second in the rotation)", api, sets),
    ]
    for name, ms in interleaved_ms(variants).items():
        record(name, ms, B=B, interleaved=True)

    # host-only part: build the graph, no evaluation
    for name, fn, src in (("graph build only: kernel object", lambda a: kern(inputs=a, **kw), arrays),
                          ("graph build only: public call",
                           lambda x: mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state,
                                                                backend="cuda"), sets)):
        t = []
        for i in range(2000):
            t0 = time.perf_counter()
            fn(src[i % 3])
            t.append(time.perf_counter() - t0)
        record(name, 1e3 * statistics.median(t), B=B)

    # GPU time per step: chains of n steps (state feeds the next) evaluated once; the slope
    # between two chain lengths removes the per-evaluation cost
    def chain(n):
        def run(a):
            ins = list(a)
            st_i = spec.input_names.index("state_in")
            for _ in range(n):
                _, ins[st_i] = kern(inputs=ins, **kw)
            mx.eval(ins[st_i])
        return run
    res = interleaved_ms([("chain 8", chain(8), arrays), ("chain 40", chain(40), arrays)], reps=30, warm=2)
    per = (res["chain 40"] - res["chain 8"]) / 32
    record("decode launch in a chain, per launch (slope 8 -> 40)", per, B=B,
           state_GBps_if_gpu_bound=round(2 * B * HV * D * D * 4 / (per * 1e-3) / 1e9, 1))


def chunked_split(B, T=4096):
    sets = sets_for(B, T, n=2)
    nh2_default = cuda.STATE_NH2_FROM
    x0 = sets[0]
    p0 = check_update(x0.q, x0.k, x0.v, x0.a, x0.b, x0.A_log, x0.dt_bias, x0.state, None, None, False)
    for bv, nh2_from in ((None, nh2_default), (32, 32), (32, 128), (64, 32), (64, 128), (128, 128)):
        cuda.CHUNK_BV, cuda.STATE_NH2_FROM = bv, nh2_from

        def full(x):
            mx.eval(*mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state,
                                                backend="cuda", algorithm="chunked"))
        record("chunked full call", wall_ms(full, sets, reps=60), B=B, T=T, BV=bv,
               warps=4 * cuda.state_nh(cuda._state_config(p0)[0]))
    cuda.CHUNK_BV, cuda.STATE_NH2_FROM = None, nh2_default
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
