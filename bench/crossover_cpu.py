"""Chunked vs recurrent ops paths vs mlx-lm's ops loop, per prompt length, on the default device.

    PYTHONPATH=. python bench/crossover_cpu.py [--T 64 512 2048 4096] [--reps 3] [--grad 2048] [--chunk 64]

Qwen3.5-like layer: B=1, Hk=16, Hv=32, Dk=Dv=128, float32. Wall time per call from Python,
synchronised after each call (mx.eval), warm-up call excluded, two input sets alternated;
prints min and median in ms. --grad T times one forward+backward step (mx.value_and_grad of a
loss over y and the state) for the chunked and recurrent paths. Results go to bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import mlx.core as mx

import mlx_gdn.ops.chunked as oc
from mlx_gdn.ops.recurrent import recurrent_rule
from mlx_gdn.testing import random_inputs

SHAPE = dict(B=1, Hk=16, Hv=32, Dk=128, Dv=128)


def _inputs(T, seed):
    s = SHAPE
    return random_inputs(s["B"], T, s["Hk"], s["Hv"], s["Dk"], s["Dv"], seed=seed)


def _time(fn, sets, reps):
    """(min, median) seconds of fn(x) over reps calls after one warm-up, inputs alternated."""
    mx.eval(fn(sets[0]))
    ts = []
    for i in range(reps):
        x = sets[i % len(sets)]
        t0 = time.perf_counter()
        mx.eval(fn(x))
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def contenders():
    out = {
        "chunked": lambda x: oc.chunked_rule(x.q, x.k, x.v, x.g, x.beta, x.state),
        "recurrent": lambda x: recurrent_rule(x.q, x.k, x.v, x.g, x.beta, x.state),
    }
    try:
        from mlx_lm.models.gated_delta import gated_delta_ops

        out["mlx-lm ops"] = lambda x: gated_delta_ops(x.q, x.k, x.v, x.g, x.beta, x.state)
    except ImportError:
        pass
    return out


def grad_step(rule):
    def loss(q, k, v, g, beta, state):
        y, s = rule(q, k, v, g, beta, state)
        return (y * y).sum() + (s * s).sum()

    vg = mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))
    return lambda x: vg(x.q, x.k, x.v, x.g, x.beta, x.state)


def profile(T, reps):
    """Chunked time split: inputs to chunk layout, the batched intra-chunk part, the state pass."""
    x = _inputs(T, 1)
    s = SHAPE
    B, Hk, Hv = s["B"], s["Hk"], s["Hv"]
    R, C = Hv // Hk, oc._chunk_size(T)
    N = -(-T // C)
    f32 = mx.float32
    q, k, v, g, beta = (t.astype(f32) for t in (x.q, x.k, x.v, x.g, x.beta))
    lg = oc._log_gate(g)
    qc, kc = (oc._to_chunks(t, B, N, C, Hk, 1) for t in (q, k))
    vc, lgc, bc = (oc._to_chunks(t, B, N, C, Hk, R) for t in (v, lg, beta))
    mx.eval(qc, kc, vc, lgc, bc)
    full = _time(lambda x: oc.chunked_rule(x.q, x.k, x.v, x.g, x.beta, x.state), [x], reps)[0]
    intra = _time(lambda _: oc._kkt_scalar_c(qc, kc, vc, lgc, bc), [x], reps)[0]
    ops = oc._kkt_scalar_c(qc, kc, vc, lgc, bc)
    mx.eval(ops)
    WQ, Uv, Yv, Kd, gam_c = ops
    S0 = x.state.reshape(B, Hk, R, s["Dv"], s["Dk"])

    def state_pass(_):
        S, ys = S0, []
        for n in range(N):
            y, S = oc._state_output_c(S, WQ[:, :, :, n], Uv[:, :, :, n], Yv[:, :, :, n], Kd[:, :, :, n], gam_c[:, :, :, n])
            ys.append(y)
        return ys + [S]

    sp = _time(state_pass, [x], reps)[0]
    print(f"| {T} profile (min ms) | full {full * 1e3:.0f} | intra {intra * 1e3:.0f} | state pass {sp * 1e3:.0f} | "
          f"rest {(full - intra - sp) * 1e3:.0f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="*", default=[64, 512, 2048])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--grad", type=int, nargs="*", default=[])
    ap.add_argument("--chunk", type=int, default=oc.chunk_len())
    ap.add_argument("--only", nargs="*", default=None, help="contender names to run")
    ap.add_argument("--no-compile", action="store_true", help="run the chunked form without mx.compile")
    ap.add_argument("--profile", type=int, nargs="*", default=[], help="T: split chunked time into its parts")
    a = ap.parse_args()
    oc.CHUNK = {"cpu": a.chunk, "gpu": a.chunk}
    if a.no_compile:
        oc._kkt_scalar_c, oc._kkt_key_c, oc._state_output_c = oc._kkt_scalar, oc._kkt_key, oc._state_output
    import mlx_lm

    print(f"device {mx.default_device()}, {platform.processor() or platform.machine()}, mlx {mx.__version__}, "
          f"mlx-lm {mlx_lm.__version__}, chunk {a.chunk}, compiled {not a.no_compile}, shape {SHAPE}, float32, reps {a.reps}")
    print("| T | contender | min ms | median ms | ms/token |")
    print("|---|---|---|---|---|")
    for T in a.T:
        sets = [_inputs(T, 1), _inputs(T, 2)]
        mx.eval([[x.q, x.k, x.v, x.g, x.beta, x.state] for x in sets])
        for name, fn in contenders().items():
            if a.only and name not in a.only:
                continue
            lo, med = _time(fn, sets, a.reps)
            print(f"| {T} | {name} | {lo * 1e3:.1f} | {med * 1e3:.1f} | {med * 1e3 / T:.3f} |", flush=True)
    for T in a.profile:
        profile(T, a.reps)
    for T in a.grad:
        sets = [_inputs(T, 1), _inputs(T, 2)]
        for name, rule in (("chunked", oc.chunked_rule), ("recurrent", recurrent_rule)):
            if a.only and name not in a.only:
                continue
            mx.reset_peak_memory()
            lo, med = _time(grad_step(rule), sets, a.reps)
            peak = mx.get_peak_memory() / 2**30
            print(f"| {T} fwd+bwd | {name} | {lo * 1e3:.1f} | {med * 1e3:.1f} | peak {peak:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
