"""Wall time per call of the CUDA paths against fla on the same GPU (run on the GPU machine).

    PYTHONUNBUFFERED=1 python bench/cuda_bench.py --out DIR [--quick]

Method (DESIGN.md section 7): each call is followed by evaluation and a device synchronise
(mx.async_eval + mx.synchronize, as torch.cuda.synchronize for fla: mx.eval would add MLX's
event wait, 0.03-0.12 ms beyond the stream's end on the H100, bench/cuda_host_split_709d9c8.json),
timed with a host clock; warm-up
calls excluded; median over many calls; three input sets rotated. Writes DIR/cuda_h100.json,
DIR/cuda_h100.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mlx_gdn  # noqa: E402
from mlx_gdn.cuda import backend as cuda, chunked as cuda_chunked, kernel as cuda_kernel  # noqa: E402
from mlx_gdn.reference import delta_rule, rel_error  # noqa: E402
from mlx_gdn.testing import random_inputs  # noqa: E402

HK, HV, D = 16, 32, 128


def wall_ms(call, sync, sets, warm=5, reps=100, max_s=4.0):
    for i in range(warm):
        call(sets[i % len(sets)])
        sync()
    times = []
    t_end = time.perf_counter() + max_s
    for i in range(reps):
        s = sets[i % len(sets)]
        t0 = time.perf_counter()
        call(s)
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end and len(times) >= 5:
            break
    return 1e3 * statistics.median(times), len(times)


def interleaved_ms(entries, rounds=8, reps=40):
    """{name: (median ms, calls)} for (name, call, sync, sets) entries timed in alternating rounds
    of `reps` calls each, so that a host's drift within the run hits every entry alike (decode is
    host-bound, and hosts drift by tens of microseconds within a run)."""
    times = {name: [] for name, *_ in entries}
    for name, call, sync, sets in entries:  # warm-up
        wall_ms(call, sync, sets, warm=5, reps=5)
    for _ in range(rounds):
        for name, call, sync, sets in entries:
            for i in range(reps):
                t0 = time.perf_counter()
                call(sets[i % len(sets)])
                sync()
                times[name].append(time.perf_counter() - t0)
    return {name: (1e3 * statistics.median(t), len(t)) for name, t in times.items()}


def mlx_sync():
    mx.synchronize()


def make_mlx_sets(B, T, dtype, n=3):
    return [random_inputs(B, T, HK, HV, D, D, dtype=dtype, seed=1000 + i) for i in range(n)]


def mlx_call(algorithm, backend="cuda"):
    def call(x):
        y, s = mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state,
                                          backend=backend, algorithm=algorithm)
        mx.async_eval(y, s)
        return y, s
    return call


def mlx_lm_call():
    from mlx_lm.models.gated_delta import gated_delta_ops

    def call(x):
        g = mlx_gdn.compute_g(x.A_log, x.a, x.dt_bias)
        beta = mlx_gdn.compute_beta(x.b)
        y, s = gated_delta_ops(x.q, x.k, x.v, g, beta, x.state)
        mx.async_eval(y, s)
        return y, s
    return call


def torch_sets(sets):
    import torch

    out = []
    for x in sets:
        def t(a, dt=torch.bfloat16):
            return torch.from_numpy(np.array(a.astype(mx.float32))).to("cuda", dt)
        A_log = np.array(x.A_log)
        dt_bias = np.array(x.dt_bias)
        a = np.array(x.a.astype(mx.float32)) + dt_bias
        gl = -np.exp(A_log) * np.logaddexp(0, a)  # log-decay, fla's g
        beta = 1 / (1 + np.exp(-np.array(x.b.astype(mx.float32))))
        dt = torch.bfloat16 if x.q.dtype == mx.bfloat16 else torch.float32
        st = torch.from_numpy(np.array(x.state)).to("cuda").transpose(-1, -2).contiguous()  # [B,H,K,V]
        out.append(dict(q=t(x.q, dt), k=t(x.k, dt), v=t(x.v, dt), g=torch.from_numpy(gl).to("cuda", torch.float32),
                        beta=torch.from_numpy(beta).to("cuda", dt), h0=st))
    return out


def fla_call(kind):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    fn = chunk_gated_delta_rule if kind == "chunk" else fused_recurrent_gated_delta_rule

    def call(x):
        return fn(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], scale=1.0, initial_state=x["h0"],
                  output_final_state=True)
    return call


def torch_sync():
    import torch

    torch.cuda.synchronize()


def check(B, T, dtype):
    """Relative error of the CUDA paths (and fla) against the float64 reference at one shape."""
    x = make_mlx_sets(B, T, dtype, 1)[0]
    g = mlx_gdn.compute_g(x.A_log, x.a, x.dt_bias)
    beta = mlx_gdn.compute_beta(x.b)
    yr, sr = delta_rule(x.q, x.k, x.v, g, beta, x.state)
    res = {}
    for algo in ("recurrent", "chunked"):
        y, s = mlx_call(algo)(x)
        res[f"cuda-{algo}"] = (rel_error(y, yr), rel_error(s, sr))
    try:
        xt = torch_sets([x])[0]
        for kind in ("recurrent", "chunk"):
            o, h = fla_call(kind)(xt)
            res[f"fla-{kind}"] = (rel_error(o.float().cpu().numpy(), yr),
                                  rel_error(h.transpose(-1, -2).float().cpu().numpy(), sr))
    except Exception as e:  # noqa: BLE001
        res["fla"] = repr(e)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode", action="store_true",
                    help="only decode (T=1, B=1/4/16), mlx-gdn and fla in alternating rounds, with the "
                         "trivial kernel; writes cuda_decode_h100.json")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch
    try:
        import fla
        fla_version = getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        fla_version = repr(e)
    env = dict(device=torch.cuda.get_device_name(0), mlx=mx.__version__, torch=torch.__version__, fla=fla_version,
               python=platform.python_version(), commit=os.environ.get("GDN_COMMIT", "?"),
               command="PYTHONUNBUFFERED=1 python bench/cuda_bench.py --out $OUT" + (" --decode" if args.decode else ""))
    print(env, flush=True)
    rows = []

    def record(name, B, T, dtype, ms, n, **kw):
        row = dict(contender=name, B=B, T=T, dtype=dtype, ms=round(ms, 4), reps=n, **kw)
        rows.append(row)
        print(f"{name:28s} B={B:<3d} T={T:<5d} {dtype:5s} {ms:9.4f} ms  (n={n})", flush=True)

    if args.decode:
        triv = mx.fast.cuda_kernel(name="gdn_probe_trivial", input_names=["x"], output_names=["o"],
                                   source="if (threadIdx.x == 0 && blockIdx.x == 0) o[0] = x[0];")
        xs = [mx.ones((4,)) for _ in range(3)]
        mx.eval(xs)
        trivial = ("probe-trivial-cuda-kernel", lambda x: mx.async_eval(triv(
            inputs=[x], output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(32, 1, 1),
            threadgroup=(32, 1, 1))[0]), mlx_sync, xs)
        base = mlx_call("recurrent")

        def elementwise(x):  # the decode body's state one 4-byte access per column (no GDN_VEC4)
            cuda.DECODE_VEC4 = False
            try:
                return base(x)
            finally:
                cuda.DECODE_VEC4 = True

        for B in (1, 4, 16):
            sets = make_mlx_sets(B, 1, mx.bfloat16)
            res = interleaved_ms([trivial, ("mlx_gdn-cuda-recurrent", base, mlx_sync, sets),
                                  ("mlx_gdn-cuda-recurrent-elementwise", elementwise, mlx_sync, sets),
                                  ("fla-recurrent", fla_call("recurrent"), torch_sync, torch_sets(sets))])
            for name, (ms, n) in res.items():
                record(name, B, 1, "f32" if name.startswith("probe") else "bf16", ms, n, method="interleaved")
        with open(os.path.join(args.out, "cuda_decode_h100.json"), "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1, default=str)
        return

    # copy bandwidth (bytes read + written) through MLX
    a = mx.random.normal((256 * 1024 * 1024 // 4,))
    mx.eval(a)
    ms, _ = wall_ms(lambda _: mx.async_eval(mx.array(a + 0)), mlx_sync, [0], reps=20)
    env["copy_TBps_mlx_elementwise"] = round(2 * a.nbytes / (ms * 1e-3) / 1e12, 3)
    del a

    # where a decode call's time goes: MLX's cost for a trivial kernel, the launcher alone,
    # the public API (validation + dispatch + launch)
    triv = mx.fast.cuda_kernel(name="gdn_probe_trivial", input_names=["x"], output_names=["o"],
                               source="if (threadIdx.x == 0 && blockIdx.x == 0) o[0] = x[0];")
    xs = [mx.ones((4,)) for _ in range(3)]
    mx.eval(xs)
    ms, n = wall_ms(lambda x: mx.async_eval(triv(inputs=[x], output_shapes=[(1,)], output_dtypes=[mx.float32],
                                           grid=(32, 1, 1), threadgroup=(32, 1, 1))[0]), mlx_sync, xs, reps=300)
    record("probe-trivial-cuda-kernel", 1, 1, "f32", ms, n)
    sets = make_mlx_sets(1, 1, mx.bfloat16)
    from mlx_gdn.gating import FusedGating
    from mlx_gdn.validate import check_update
    x0 = sets[0]
    p0 = check_update(x0.q, x0.k, x0.v, x0.a, x0.b, x0.A_log, x0.dt_bias, x0.state, None, None, False)

    def direct(x):
        y, s = cuda.run_recurrent(p0, x.q, x.k, x.v, x.state, None,
                                  gating=FusedGating(x.a, x.b, x.A_log, x.dt_bias))
        mx.async_eval(y, s)
    ms, n = wall_ms(direct, mlx_sync, sets, reps=300)
    record("probe-run_recurrent-direct", 1, 1, "bf16", ms, n)
    from mlx_gdn import launch
    spec = launch.recurrent_spec(p0)
    kern = cuda_kernel.kernel_for_spec(spec)
    prepared = [launch.recurrent_inputs(x.q, x.k, x.v, x.state, None,
                                                    gating=FusedGating(x.a, x.b, x.A_log, x.dt_bias))
                for x in sets]
    kw = spec.call_kwargs()
    ms, n = wall_ms(lambda ins: mx.async_eval(*kern(inputs=ins, **kw)), mlx_sync, prepared, reps=300)
    record("probe-kernel-object-only", 1, 1, "bf16", ms, n)
    ms, n = wall_ms(mlx_call("recurrent"), mlx_sync, sets, reps=300)
    record("probe-api-update", 1, 1, "bf16", ms, n)

    checks = {}
    for dt in ("bf16", "f32"):
        checks[dt] = {k: v for k, v in check(1, 512, mx.bfloat16 if dt == "bf16" else mx.float32).items()}
        print("check vs float64, B=1 T=512", dt, checks[dt], flush=True)

    cells = [(1, 1), (4, 1), (16, 1), (1, 64), (1, 512), (1, 4096), (4, 4096)]
    if args.quick:
        cells = [(1, 1), (16, 1), (1, 4096)]
    for B, T in cells:
        sets = make_mlx_sets(B, T, mx.bfloat16)
        tsets = torch_sets(sets)
        algos = ["recurrent"] + (["chunked"] if T >= 64 else [])
        for algo in algos:
            ms, n = wall_ms(mlx_call(algo), mlx_sync, sets, reps=300 if T == 1 else 100)
            record(f"mlx_gdn-cuda-{algo}", B, T, "bf16", ms, n)
        if T >= 64:
            for bv in (32, 64, 128):
                cuda_chunked.CHUNK_BV = bv
                ms, n = wall_ms(mlx_call("chunked"), mlx_sync, sets, reps=60)
                record(f"mlx_gdn-cuda-chunked-BV{bv}", B, T, "bf16", ms, n)
            cuda_chunked.CHUNK_BV = None
        for kind in ("recurrent", "chunk"):
            if kind == "chunk" and T == 1:
                continue
            try:
                ms, n = wall_ms(fla_call(kind), torch_sync, tsets, reps=300 if T == 1 else 100)
                record(f"fla-{kind}", B, T, "bf16", ms, n)
            except Exception as e:  # noqa: BLE001
                print("fla failed", kind, repr(e)[:300], flush=True)

    # crossover, bf16 and f32, B=1
    for dt, mdt in (("bf16", mx.bfloat16), ("f32", mx.float32)):
        for T in (16, 32, 64, 128, 256):
            sets = make_mlx_sets(1, T, mdt)
            for algo in ("recurrent", "chunked"):
                ms, n = wall_ms(mlx_call(algo), mlx_sync, sets, reps=100)
                record(f"mlx_gdn-cuda-{algo}", 1, T, dt, ms, n, sweep="crossover")

    # float32 T=4096 B=1: chunked CUDA vs ops chunked vs mlx-lm's ops loop
    sets = make_mlx_sets(1, 4096, mx.float32)
    for algo in ("chunked", "recurrent"):
        ms, n = wall_ms(mlx_call(algo), mlx_sync, sets, reps=50)
        record(f"mlx_gdn-cuda-{algo}", 1, 4096, "f32", ms, n)
    try:
        ms, n = wall_ms(mlx_call("chunked", backend="ops"), mlx_sync, sets, warm=2, reps=10, max_s=10)
        record("mlx_gdn-ops-chunked", 1, 4096, "f32", ms, n)
    except Exception as e:  # noqa: BLE001
        print("ops chunked failed", repr(e)[:300], flush=True)
    try:
        ms, n = wall_ms(mlx_lm_call(), mlx_sync, sets, warm=1, reps=3, max_s=5)
        record("mlx_lm-ops", 1, 4096, "f32", ms, n)
    except Exception as e:  # noqa: BLE001
        print("mlx-lm failed", repr(e)[:300], flush=True)
    tsets = torch_sets(sets)
    ms, n = wall_ms(fla_call("chunk"), torch_sync, tsets, reps=50)
    record("fla-chunk", 1, 4096, "f32", ms, n)

    out = dict(env=env, checks=checks, rows=rows)
    with open(os.path.join(args.out, "cuda_h100.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    try:
        plot(rows, os.path.join(args.out, "cuda_h100.png"), env)
    except Exception as e:  # noqa: BLE001
        print("plot failed", repr(e))


def plot(rows, path, env):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, B in zip(axes, (1, 4)):
        for name in ("mlx_gdn-cuda-recurrent", "mlx_gdn-cuda-chunked", "fla-recurrent", "fla-chunk"):
            pts = sorted((r["T"], r["ms"]) for r in rows
                         if r["contender"] == name and r["B"] == B and r["dtype"] == "bf16" and "sweep" not in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens per call)")
        ax.set_ylabel("wall ms per call")
        ax.set_title(f"B={B}, bf16, Hk={HK} Hv={HV} Dk=Dv={D}")
        ax.legend()
    fig.suptitle(f"{env['device']}  mlx {env['mlx']}  fla {env['fla']}  commit {env['commit'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
