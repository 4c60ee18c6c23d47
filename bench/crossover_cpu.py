"""Recurrent vs chunked ops paths vs mlx-lm's `gated_delta_update`, per prompt length and dtype.

    PYTHONPATH=. python bench/crossover_cpu.py [--T 1 2 4 8 16 32 64 128 512] [--dtypes float32 bfloat16]
        [--rounds 5] [--gates trained|mild] [--json bench/crossover_cpu.json]
        [--profile 512] [--grad 2048] [--chunk 32] [--only recurrent chunked] [--no-compile]

Qwen3.5 layer shape (B=1, Hk=16, Hv=32, Dk=Dv=128). Inputs as `python -m mlx_gdn.bench` makes
them (`bench.inputs.make_inputs`): "trained" gates have exp(A_log) over [0.5, 16] and a, b of
scale 2, so most cumulative decays within a chunk fall below float32's normal range; "mild"
shifts a by -6 (decays about 0.9-1). Every contender takes the raw gates (a, b, A_log, dt_bias)
as models call it. Timing: the contenders take turns round by round (`timing.alternating_rounds`),
each round a median over calls for at least 50 ms; reported are the median per contender and the
median of the per-round ratios to mlx-lm, with the load average before and after (the machine
may be shared). --profile T splits the chunked form's time into its parts; --grad T times one
forward+backward step. Results go to bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import mlx.core as mx

import mlx_gdn
import mlx_gdn.ops.chunked as oc
from mlx_gdn import backends
from mlx_gdn.bench.inputs import make_inputs
from mlx_gdn.bench.shapes import PRESETS, Config
from mlx_gdn.bench.timing import alternating_rounds
from mlx_gdn.gating import compute_g
from mlx_gdn.ops.recurrent import recurrent_rule

SHAPE = "qwen3.5"


def _inputs(T, seed, dtype="float32", gates="trained"):
    Hk, Hv, Dk, Dv = PRESETS[SHAPE]
    s = make_inputs(Config(SHAPE, 1, T, Hk, Hv, Dk, Dv, dtype), seed)
    if gates == "mild":
        s.a = s.a - 6.0
        s.g = compute_g(s.a, s.A_log, s.dt_bias)
        mx.eval(s.a, s.g)
    return s


def _sync(out):
    mx.eval(out)


def contenders():
    """name -> fn(input set) -> outputs; this package's paths through the public API, fused gates."""

    def ours(algorithm):
        return lambda s: mlx_gdn.gated_delta_update(s.q, s.k, s.v, s.a, s.b, s.A_log, s.dt_bias, s.state,
                                                    backend="ops", algorithm=algorithm)

    out = {"recurrent": ours("recurrent"), "chunked": ours("chunked")}
    # What a model gets: backend and algorithm "auto" (on the CPU: ops, by CHUNKED_FROM_T).
    out["auto"] = lambda s: mlx_gdn.gated_delta_update(s.q, s.k, s.v, s.a, s.b, s.A_log, s.dt_bias, s.state)
    try:
        from mlx_lm.models.gated_delta import gated_delta_update

        out["mlx-lm"] = lambda s: gated_delta_update(s.q, s.k, s.v, s.a, s.b, s.A_log, s.dt_bias, s.state)
    except ImportError:
        pass
    return out


def sweep(Ts, dtypes, rounds, gates, only=None):
    """Rows: per (T, dtype) each contender's per-round medians (ms) and ratios to mlx-lm."""
    rows = []
    for dtype in dtypes:
        for T in Ts:
            sets = [_inputs(T, 1, dtype, gates), _inputs(T, 2, dtype, gates)]
            fns = {n: f for n, f in contenders().items() if not only or n in only or n == "mlx-lm"}
            turn = {"i": 0}

            def rotating(f):
                def call():
                    turn["i"] += 1
                    return f(sets[turn["i"] % 2])
                return call

            times = alternating_rounds({n: rotating(f) for n, f in fns.items()}, _sync, rounds=rounds)
            row = {"T": T, "dtype": dtype, "gates": gates, "ms": {n: [t * 1e3 for t in ts] for n, ts in times.items()}}
            row["median_ms"] = {n: statistics.median(ts) for n, ts in row["ms"].items()}
            if "mlx-lm" in times:
                base = times["mlx-lm"]
                row["ratio_to_mlx_lm"] = {
                    n: statistics.median(a / b for a, b in zip(ts, base)) for n, ts in times.items() if n != "mlx-lm"
                }
            rows.append(row)
            med = " | ".join(f"{n} {m:.2f}" for n, m in row["median_ms"].items())
            rat = " | ".join(f"{n}/mlx-lm {r:.2f}" for n, r in row.get("ratio_to_mlx_lm", {}).items())
            print(f"| {T} | {dtype} | {med} | {rat} | load {os.getloadavg()[0]:.1f} |", flush=True)
    return rows


def grad_step(rule):
    def loss(q, k, v, g, beta, state):
        y, s = rule(q, k, v, g, beta, state)
        return (y * y).sum() + (s * s).sum()

    vg = mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))
    return lambda x: vg(x.q, x.k, x.v, x.g, x.beta, x.state)


def _min_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t0)
    return min(ts)


def profile(T, reps, gates):
    """Chunked time split: the batched intra-chunk part, the state pass, the rest."""
    x = _inputs(T, 1, "float32", gates)
    Hk, Hv, Dk, Dv = PRESETS[SHAPE]
    B, R, C = 1, Hv // Hk, oc._chunk_size(T)
    N = -(-T // C)
    lg = oc._log_gate(x.g)
    qc, kc = (oc._to_chunks(t, B, N, C, Hk, 1) for t in (x.q, x.k))
    vc, lgc, bc = (oc._to_chunks(t, B, N, C, Hk, R) for t in (x.v, lg, x.beta))
    mx.eval(qc, kc, vc, lgc, bc)
    full = _min_time(lambda: oc.chunked_rule(x.q, x.k, x.v, x.g, x.beta, x.state), reps)
    intra = _min_time(lambda: oc._kkt_scalar_c(qc, kc, vc, lgc, bc), reps)
    ops = oc._kkt_scalar_c(qc, kc, vc, lgc, bc)
    mx.eval(ops)
    parts = [[p.squeeze(3) for p in mx.split(t, N, axis=3)] for t in ops]
    S0 = mx.swapaxes(x.state.reshape(B, Hk, R, Dv, Dk), -1, -2)  # the pass carries the state transposed

    def state_pass():
        S, ys = S0, []
        for n in range(N):
            y, S = oc._state_output_c(S, *(p[n] for p in parts))
            ys.append(y)
        return ys + [S]

    sp = _min_time(state_pass, reps)
    print(f"| {T} profile, {gates} gates (min ms) | full {full * 1e3:.0f} | intra {intra * 1e3:.0f} | "
          f"state pass {sp * 1e3:.0f} | rest {(full - intra - sp) * 1e3:.0f} |", flush=True)
    return {"T": T, "gates": gates, "full_ms": full * 1e3, "intra_ms": intra * 1e3, "state_pass_ms": sp * 1e3}


def environment(args):
    import mlx_lm

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "device": str(mx.default_device()),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "mlx_gdn": getattr(mlx_gdn, "__version__", None),
        "commit": commit,
        "tree_dirty": dirty,
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        "chunk": args.chunk,
        "compiled": not args.no_compile,
        "shape": dict(zip(("Hk", "Hv", "Dk", "Dv"), PRESETS[SHAPE]), B=1),
        "chunked_from_t": dict(backends.CHUNKED_FROM_T),
        "loadavg_before": os.getloadavg(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gates", choices=("trained", "mild"), default="trained")
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--grad", type=int, nargs="*", default=[])
    ap.add_argument("--chunk", type=int, default=oc.chunk_len())
    ap.add_argument("--only", nargs="*", default=None, help="contender names to run (mlx-lm always runs)")
    ap.add_argument("--no-compile", action="store_true", help="run the chunked form without mx.compile")
    ap.add_argument("--profile", type=int, nargs="*", default=[], help="T: split chunked time into its parts")
    a = ap.parse_args()
    oc.CHUNK = {"cpu": a.chunk, "gpu": a.chunk}
    if a.no_compile:
        oc._kkt_scalar_c, oc._kkt_key_c, oc._state_output_c = oc._kkt_scalar, oc._kkt_key, oc._state_output
    env = environment(a)
    print(" ".join(f"{k} {v}" for k, v in env.items()))
    print("| T | dtype | median ms per call | ratio to mlx-lm (median over rounds) | load |")
    print("|---|---|---|---|---|")
    result = {"environment": env, "rows": sweep(a.T, a.dtypes, a.rounds, a.gates, a.only)}
    result["profile"] = [profile(T, 3, a.gates) for T in a.profile]
    result["grad"] = []
    for T in a.grad:
        sets = [_inputs(T, 1, "float32", a.gates), _inputs(T, 2, "float32", a.gates)]
        for name, rule in (("chunked", oc.chunked_rule), ("recurrent", recurrent_rule)):
            if a.only and name not in a.only:
                continue
            mx.reset_peak_memory()
            step = grad_step(rule)
            t = _min_time(lambda: step(sets[0]), 3)
            peak = mx.get_peak_memory() / 2**30
            result["grad"].append({"T": T, "path": name, "min_ms": t * 1e3, "peak_GiB": peak})
            print(f"| {T} fwd+bwd | {name} | min {t * 1e3:.1f} ms | peak {peak:.2f} GiB |", flush=True)
    env["loadavg_after"] = os.getloadavg()
    print(f"load average after: {env['loadavg_after']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
