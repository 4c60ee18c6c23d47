"""GPU time of each kernel a call launches, read from CUPTI through torch's profiler (GPU machine).

    PYTHONUNBUFFERED=1 python bench/cuda_kernel_times.py --out DIR

Wall time per call (bench/cuda_bench.py) mixes the host's launch cost with the GPU's work; this
separates them. CUPTI records every kernel in the process, so MLX's kernels (launched through
CUDA graphs) and fla's Triton kernels are timed by the same clock. Each case runs `--reps`
calls, each evaluated and synchronised, inside one profile; reported: GPU microseconds per call
for each kernel name, their sum, and the state bytes over that sum where the state dominates.
Shapes: bf16, Hk=16, Hv=32, Dk=Dv=128 (the benchmark's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mlx_gdn import launch  # noqa: E402
from mlx_gdn.cuda import backend as cuda, chunked as cuda_chunked  # noqa: E402

import cuda_bench  # noqa: E402  (bench/, this script's folder)

ROWS = []


def kernel_times(call, sync, data, reps):
    """{kernel name: GPU us per call} over `reps` calls (after 5 warm-up calls)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for i in range(5):
        call(data[i % len(data)])
        sync()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            call(data[i % len(data)])
            sync()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for ev in prof.events():
        # GPU-side records only: host-side records of launches carry their kernels' time too
        if "CUDA" not in str(getattr(ev, "device_type", "")):
            continue
        per[ev.name] += ev.time_range.elapsed_us() / reps
    return dict(per)


def record(case, per, state_bytes=None, wall=None, **kw):
    """One case: GPU us per call by kernel, their sum, and (when given) wall ms per call."""
    total = sum(per.values())
    row = dict(case=case, gpu_us=round(total, 2), kernels={k[:90]: round(v, 2) for k, v in per.items()}, **kw)
    if wall is not None:
        row["wall_ms"] = round(wall, 4)
    if state_bytes:
        row["state_TBps"] = round(state_bytes / (total * 1e-6) / 1e12, 2) if total else None
    ROWS.append(row)
    print(f"{case:52s} {kw} GPU {total:9.2f} us  wall {row.get('wall_ms', '')} ms  state TB/s "
          f"{row.get('state_TBps', '')}", flush=True)
    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"      {v:9.2f} us  {k[:100]}", flush=True)


def timed(case, call, sync, data, reps, **kw):
    """record() with both the GPU breakdown and the wall time (bench/cuda_bench.py's method)."""
    per = kernel_times(call, sync, data, reps)
    wall = cuda_bench.wall_ms(call, sync, data, reps=300, max_s=2.0)[0]
    record(case, per, wall=wall, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--decode", action="store_true", help="only the decode cells (T=1)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    env = dict(mlx=mx.__version__, torch=torch.__version__, gpu=torch.cuda.get_device_name(),
               commit=os.environ.get("GDN_COMMIT", "?"),
               command="PYTHONUNBUFFERED=1 python bench/cuda_kernel_times.py --out $OUT" + (" --decode" if args.decode else ""))
    print(env, flush=True)
    H, D = cuda_bench.HV, cuda_bench.D

    one = mx.fast.cuda_kernel(name="times_one", input_names=["x"], output_names=["o"],
                              source="if (threadIdx.x == 0 && blockIdx.x == 0) o[0] = x[0];")
    xs = [mx.ones((4,))]
    mx.eval(xs)
    timed("MLX trivial kernel", lambda x: mx.eval(one(inputs=[x], output_shapes=[(1,)], output_dtypes=[mx.float32],
                                                     grid=(32, 1, 1), threadgroup=(32, 1, 1))[0]),
          mx.synchronize, xs, args.reps)

    default_per_lane = launch.DECODE_STATE_PER_LANE
    for B, T in ((1, 1), (16, 1)) + (() if args.decode else ((1, 4096), (4, 4096))):
        sets = cuda_bench.make_mlx_sets(B, T, mx.bfloat16, n=2)
        for x in sets:
            mx.eval(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state)
        shape = dict(B=B, T=T)
        if T == 1:
            sb = 2 * B * H * D * D * 4  # state read and written once
            # the decode layout: state columns per lane (Dk / lanes per row), default first
            for per in (default_per_lane,) + tuple(c for c in (4, 8, 16, 32) if c != default_per_lane):
                launch.DECODE_STATE_PER_LANE = per
                launch.recurrent_launcher.cache_clear()
                timed(f"mlx-gdn recurrent, {per} state columns per lane", cuda_bench.mlx_call("recurrent"),
                      mx.synchronize, sets, args.reps, state_bytes=sb, **shape)
            launch.DECODE_STATE_PER_LANE = default_per_lane
            cuda.DECODE_VEC4 = False  # each column its own 4-byte access, as before GDN_VEC4
            launch.recurrent_launcher.cache_clear()
            timed(f"mlx-gdn recurrent, {default_per_lane} columns per lane, element-wise",
                  cuda_bench.mlx_call("recurrent"), mx.synchronize, sets, args.reps, state_bytes=sb, **shape)
            cuda.DECODE_VEC4 = True
            launch.recurrent_launcher.cache_clear()
            timed("MLX state copy (x * 1)", lambda x: mx.eval(x.state * 1.0), mx.synchronize, sets, args.reps,
                  state_bytes=sb, **shape)
        else:
            sb = None
            cuda_chunked.STATE_REGS = False
            timed("mlx-gdn chunked", cuda_bench.mlx_call("chunked"), mx.synchronize, sets, args.reps, **shape)
            cuda_chunked.STATE_REGS = True  # the state pass with S in registers, whatever the shape rule chooses
            timed("mlx-gdn chunked, state in registers", cuda_bench.mlx_call("chunked"), mx.synchronize, sets,
                  args.reps, **shape)
            cuda_chunked.STATE_REGS = None
        tsets = cuda_bench.torch_sets(sets)
        if T == 1:
            timed("torch state copy (clone)", lambda x: x["h0"].clone(), torch.cuda.synchronize, tsets, args.reps,
                  state_bytes=sb, **shape)
        try:
            kind = "recurrent" if T == 1 else "chunk"
            timed(f"fla {kind}", cuda_bench.fla_call(kind), torch.cuda.synchronize, tsets, args.reps,
                  state_bytes=sb, **shape)
        except Exception as e:  # fla absent or failing: mlx-gdn's figures still stand
            print("fla:", type(e).__name__, e, flush=True)
        del sets, tsets

    with open(os.path.join(args.out, "cuda_kernel_times.json"), "w") as f:
        json.dump(dict(env=env, rows=ROWS), f, indent=1)


if __name__ == "__main__":
    main()
