"""Forward + backward of one Gated DeltaNet layer's recurrence: time and peak memory (GPU machine).

    PYTHONUNBUFFERED=1 python bench/train_bench.py --out bench/train_h200.json

For each shape (default B=1 T=4096, B=1 T=8192, B=4 T=8192; bfloat16; Hk=16, Hv=32, Dk=Dv=128)
and path, one training step of the layer: `gated_delta_update` forward and the VJP of (y, state)
with random cotangents, gradients for q, k, v, a, b, A_log, dt_bias and the initial state, all
evaluated. Paths: the package on each backend x algorithm asked for (default cuda/chunked, whose
backward runs the CUDA kernels (cuda.chunked_backward), and cuda/chunked+ops-backward, the same
forward with the chunked backward in MLX ops; cuda/recurrent and ops/chunked take the ops backward
too), mlx-lm's own
`gated_delta_update` by autodiff (what training ran before; skipped where its per-step states
would not fit), and, when torch and fla import, fla's chunk_gated_delta_rule forward + backward
on the same inputs (g in log space, q prescaled, scale=1).

Method: each step is followed by a device synchronise (mx.async_eval + mx.synchronize;
torch.cuda.synchronize for fla); two warm-up steps excluded; median over up to --reps steps
within --budget seconds (wall time). GPU time per step from CUPTI (mlx_gdn.bench.gpu_time; needs
torch) over --gpu-reps more steps. Each package row says which backward ran. Peak memory: the allocator's peak during one more step, minus what was
allocated before it (inputs and cotangents), and the absolute peak. Gradients of q, k, v are
compared between the package's paths and with fla's (relative error). Writes JSON with the
device, versions, commit and command line, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mlx_gdn  # noqa: E402
from mlx_gdn.bench import gpu_time  # noqa: E402
from mlx_gdn.bench.env import environment  # noqa: E402
from mlx_gdn.cuda import chunked_backward as cuda_backward  # noqa: E402
from mlx_gdn.reference import rel_error  # noqa: E402
from mlx_gdn.testing import random_inputs  # noqa: E402

DTYPES = {"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32}
ARGNAMES = ("q", "k", "v", "a", "b", "A_log", "dt_bias", "state")


def _sync(out) -> None:
    mx.async_eval(out)
    mx.synchronize()


def _timed(step, sync, budget: float, reps: int) -> dict:
    for _ in range(2):
        sync(step())
    times = []
    start = time.perf_counter()
    while len(times) < reps:
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
        if len(times) >= 3 and time.perf_counter() - start > budget:
            break
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "reps": len(times)}


def _inputs(B, T, Hk, Hv, D, dtype, seed):
    x = random_inputs(B, T, Hk, Hv, D, D, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    dy = mx.array(rng.standard_normal((B, T, Hv, D), dtype=np.float32)).astype(dtype)
    ds = mx.array(rng.standard_normal((B, Hv, D, D), dtype=np.float32) * 0.01)
    mx.eval(*(getattr(x, n) for n in ARGNAMES), dy, ds)
    return x, dy, ds


def _problem(x):
    from mlx_gdn.validate import check_update

    return check_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, None, None, False)


def package_step(x, dy, ds, backend, algorithm):
    """One forward + VJP through the package; returns (outputs, gradients)."""

    def f(q, k, v, a, b, A_log, dt_bias, state):
        return mlx_gdn.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state, backend=backend, algorithm=algorithm)

    primals = [getattr(x, n) for n in ARGNAMES]
    return lambda: mx.vjp(f, primals, [dy, ds])


def mlx_lm_step(x, dy, ds):
    """mlx-lm's own ops path by MLX autodiff (the training path of unpatched models)."""
    from mlx_lm.models.gated_delta import gated_delta_update

    def f(q, k, v, a, b, A_log, dt_bias, state):
        # mlx-lm applies no scale inside either; use_kernel=False is its differentiable path.
        return gated_delta_update(q, k, v, a, b, A_log, dt_bias, state, use_kernel=False)

    primals = [getattr(x, n) for n in ARGNAMES]
    return lambda: mx.vjp(f, primals, [dy, ds])


def _gpu(step, sync) -> dict:
    t = gpu_time.kernel_times([step], sync, reps=ARGS.gpu_reps)
    if t is None:
        return {}
    top = sorted(t["kernels"].items(), key=lambda kv: -kv[1])[:8]
    return {"gpu_ms": t["gpu_us"] / 1e3, "launches": t["launches"], "top_kernels_us": dict(top)}


def measure_mlx(step) -> dict:
    r = _timed(step, _sync, ARGS.budget, ARGS.reps)
    r.update(_gpu(step, _sync))
    mx.synchronize()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    out = step()
    _sync(out)
    peak = mx.get_peak_memory()
    r.update(peak_gb=peak / 1e9, peak_above_inputs_gb=(peak - before) / 1e9)
    return r, out


def fla_step(x, dy, ds):
    """fla's chunk_gated_delta_rule forward + backward on the same inputs, or None."""
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        if not torch.cuda.is_available():
            return None
    except Exception as e:  # noqa: BLE001
        print(f"fla not measured: {type(e).__name__}: {e}")
        return None
    tdt = {mx.bfloat16: torch.bfloat16, mx.float16: torch.float16, mx.float32: torch.float32}[x.q.dtype]

    def t(a, dt=tdt, grad=True):
        arr = np.array(a.astype(mx.float32), dtype=np.float32)
        return torch.from_numpy(arr).to("cuda", dtype=dt).requires_grad_(grad)

    q, k, v = t(x.q), t(x.k), t(x.v)
    # Log-decay from the raw gate inputs, as the package computes g (fla's g is log g).
    a64 = np.array(x.a.astype(mx.float32), np.float64) + np.array(x.dt_bias, np.float64)
    lg = -np.exp(np.array(x.A_log, np.float64)) * np.logaddexp(0.0, a64)
    g = torch.from_numpy(lg.astype(np.float32)).cuda().requires_grad_(True)
    beta = t(mx.sigmoid(x.b.astype(mx.float32)))
    h0 = torch.from_numpy(np.swapaxes(np.array(x.state), -1, -2).copy()).cuda().requires_grad_(True)
    tdy = t(dy, grad=False)
    tds = torch.from_numpy(np.swapaxes(np.array(ds), -1, -2).copy()).cuda()

    def step():
        for p in (q, k, v, g, beta, h0):
            p.grad = None
        y, ht = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, scale=1.0, initial_state=h0,
                                       output_final_state=True, use_qk_l2norm_in_kernel=False)
        torch.autograd.backward([y, ht], [tdy, tds])
        return q.grad, k.grad, v.grad

    def measure():
        r = _timed(step, lambda _: torch.cuda.synchronize(), ARGS.budget, ARGS.reps)
        r.update(_gpu(step, lambda _: torch.cuda.synchronize()))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        r.update(peak_gb=peak / 1e9, peak_above_inputs_gb=(peak - before) / 1e9)
        return r, [gr.float().cpu().numpy() for gr in grads]

    return measure, torch, chunk_gated_delta_rule


def _record(record, row):
    """Add a row and rewrite the JSON, so a crash later in the run keeps what was measured."""
    record["results"].append(row)
    print(row, flush=True)
    with open(ARGS.out, "w") as f:
        json.dump(record, f, indent=1)


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="train_bench.json")
    ap.add_argument("--shapes", default="1x4096,1x8192,4x8192", help="BxT, comma-separated")
    ap.add_argument("--heads", default="16,32", help="Hk,Hv")
    ap.add_argument("--dim", type=int, default=128, help="Dk = Dv")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--paths", default="cuda/chunked,cuda/chunked+ops-backward",
                    help="backend/algorithm of the package, comma-separated; +ops-backward: the ops backward "
                         "in place of the CUDA kernel backward")
    ap.add_argument("--no-mlx-lm", action="store_true", help="skip mlx-lm's autodiff path")
    ap.add_argument("--budget", type=float, default=5.0, help="seconds of timed steps per path and shape")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--gpu-reps", type=int, default=10, help="steps timed by CUPTI per path and shape")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group", type=int, default=None,
                    help="chunks per group in the chunked backward (mlx_gdn.ops.chunked_backward.GROUP; 0: all)")
    ARGS = ap.parse_args()
    from mlx_gdn.ops import chunked_backward

    if ARGS.group is not None:
        chunked_backward.GROUP = ARGS.group
    Hk, Hv = (int(h) for h in ARGS.heads.split(","))
    D, dtype = ARGS.dim, DTYPES[ARGS.dtype]
    try:
        mem_limit = mx.device_info().get("memory_size") or mx.device_info().get("total_memory")
    except Exception:  # noqa: BLE001
        mem_limit = None
    record = {"environment": environment(), "dtype": ARGS.dtype, "Hk": Hk, "Hv": Hv, "Dk": D, "Dv": D,
              "backward_group": chunked_backward.GROUP, "results": []}
    print(record["environment"]["device"], "| mlx", mx.__version__, "| commit", record["environment"]["git_commit"])
    for shape in ARGS.shapes.split(","):
        B, T = (int(s) for s in shape.split("x"))
        x, dy, ds = _inputs(B, T, Hk, Hv, D, dtype, ARGS.seed)
        grads = {}
        for path in ARGS.paths.split(","):
            backend, algorithm = path.split("+")[0].split("/")
            ops_bwd = path.endswith("+ops-backward")
            row = {"B": B, "T": T, "path": f"mlx-gdn {path}"}
            supports = cuda_backward.supports
            try:
                if ops_bwd:
                    cuda_backward.supports = lambda p: False
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    r, (_, g) = measure_mlx(package_step(x, dy, ds, backend, algorithm))
                p = _problem(x)
                # Only the package's fallback warning means the ops backward ran (CUPTI's profiler
                # warns on its own too).
                fell_back = any("mlx_gdn" in str(w.message) for w in caught)
                kernel_bwd = backend == "cuda" and cuda_backward.supports(p) and not fell_back
                row["backward"] = "cuda kernels" if kernel_bwd else "ops"
                if caught:
                    row["warnings"] = [str(w.message)[:300] for w in caught]
                grads[path] = [np.array(gr.astype(mx.float32)) for gr in g[:3]]
                row.update(r, finite=all(np.isfinite(gr).all() for gr in grads[path]))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            finally:
                cuda_backward.supports = supports
            _record(record, row)
        fla = fla_step(x, dy, ds)
        if fla is not None:
            measure, torch, _ = fla
            row = {"B": B, "T": T, "path": "fla chunk_gated_delta_rule", "torch": torch.__version__}
            try:
                r, g = measure()
                grads["fla"] = g
                row.update(r)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            _record(record, row)
            del fla, measure
            torch.cuda.empty_cache()
        states_bytes = 4 * B * T * Hv * D * D  # what autodiff through the recurrence keeps
        if not ARGS.no_mlx_lm:
            row = {"B": B, "T": T, "path": "mlx-lm gated_delta_update (autodiff, use_kernel=False)"}
            # Its peak was 13x the per-step states on the CPU (3.48 GB at T=4096, Hv=4, Dk=Dv=64,
            # float32); an allocation past the device's memory may crash MLX rather than raise, so
            # it runs last per shape (results so far are written first) and only where that fits.
            if mem_limit and 14 * states_bytes > mem_limit:
                row["skipped"] = f"per-step states {states_bytes / 1e9:.0f} GB, x14 > device memory"
            else:
                try:
                    r, (_, g) = measure_mlx(mlx_lm_step(x, dy, ds))
                    grads["mlx-lm"] = [np.array(gr.astype(mx.float32)) for gr in g[:3]]
                    row.update(r)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
            _record(record, row)
            mx.clear_cache()
        # Agreement of dq, dk, dv between every path and the first that ran.
        names = list(grads)
        if names:
            first = names[0]
            agree = {n: {w: rel_error(a, b) for w, a, b in zip(("dq", "dk", "dv"), grads[n], grads[first])}
                     for n in names[1:]}
            _record(record, {"B": B, "T": T, "gradient_rel_error_vs": first, "errors": agree})
            print("gradients vs", first, agree)
        del x, dy, ds, grads
        mx.clear_cache()
    with open(ARGS.out, "w") as f:
        json.dump(record, f, indent=1)
    print("\n| B | T | path | backward | wall median ms | GPU ms | peak GB | above inputs GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in record["results"]:
        if "path" in r and "median_ms" in r:
            gpu = f"{r['gpu_ms']:.2f}" if "gpu_ms" in r else "-"
            print(f"| {r['B']} | {r['T']} | {r['path']} | {r.get('backward', '')} | {r['median_ms']:.2f} | {gpu} | "
                  f"{r['peak_gb']:.2f} | {r['peak_above_inputs_gb']:.2f} |")
        elif "path" in r:
            print(f"| {r['B']} | {r['T']} | {r['path']} | | {r.get('error') or r.get('skipped')} | | | |")
    print("wrote", ARGS.out)


if __name__ == "__main__":
    main()
