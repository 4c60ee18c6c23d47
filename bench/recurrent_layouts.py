"""Lanes-per-row layouts of the recurrent bodies, timed through MLX's CUDA backend.

Run on a machine with MLX-CUDA:  python bench/recurrent_layouts.py OUT.json
For each state-columns-per-lane setting (Dk / lanes per row) of the decode and prefill bodies:
checks against the float64 reference, then times the Qwen3.5 layer (Hk=16, Hv=32, Dk=Dv=128,
bf16, fused gating): wall time per call from Python, evaluated and synchronised after each call,
median of N after warm-up, inputs rotated over 4 sets.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time

import mlx.core as mx

from mlx_gdn import cuda, launch, reference
from mlx_gdn.gating import FusedGating
from mlx_gdn.testing import random_inputs
from mlx_gdn.validate import check_update

QWEN = dict(Hk=16, Hv=32, Dk=128, Dv=128)
CASES = [(1, 1), (16, 1), (1, 64), (1, 512), (4, 512), (1, 4096)]  # (B, T)
DECODE_PER = (4, 8, 16, 32)
PREFILL_PER = (16, 32, 64, 128)


def call(p, x, path, lower_bound=None, neg=False):
    gating = FusedGating(x.a, x.b, x.A_log, x.dt_bias, lower_bound, neg)
    return cuda.run_recurrent(p, x.q, x.k, x.v, x.state, x.mask, gating=gating, path=path)


def problem(x, lower_bound=None, neg=False):
    return check_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask, lower_bound, neg)


def check(path) -> float:
    worst = 0.0
    for seed, (B, T, Hk, Hv, Dk, Dv, mask) in enumerate(
        [(2, 37, 2, 4, 128, 128, True), (1, 5, 1, 3, 192, 64, False), (1, 1, 2, 2, 256, 256, False)]
    ):
        x = random_inputs(B, T, Hk, Hv, Dk, Dv, dtype=mx.bfloat16, seed=seed, mask=mask)
        y, s = call(problem(x, -2.0, True), x, path, -2.0, True)
        g, beta = reference.gates(x.a, x.b, x.A_log, x.dt_bias, -2.0, True)
        y_ref, s_ref = reference.delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)
        worst = max(worst, reference.rel_error(y, y_ref), reference.rel_error(s, s_ref))
    return worst


def time_case(B, T, path, n) -> float:
    sets = [random_inputs(B, T, dtype=mx.bfloat16, seed=i, **QWEN) for i in range(4)]
    p = problem(sets[0])
    for x in sets:
        mx.eval(*call(p, x, path))
    times = []
    for i in range(n):
        x = sets[i % 4]
        t0 = time.perf_counter()
        mx.eval(*call(p, x, path))
        mx.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(out_path: str) -> None:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    rows = []
    for path, pers, knob in (
        ("decode", DECODE_PER, "DECODE_STATE_PER_LANE"),
        ("prefill", PREFILL_PER, "PREFILL_STATE_PER_LANE"),
    ):
        default = getattr(launch, knob)
        for per in pers:
            setattr(launch, knob, per)
            err = check(path)
            for B, T in CASES:
                if path == "decode" and T > 64:
                    continue
                n = 20 if B * T >= 2048 else 100
                ms = time_case(B, T, path, n)
                rows.append(dict(path=path, state_per_lane=per, B=B, T=T, ms=round(ms, 4), max_rel_error=err))
                print(f"{path:8s} per_lane={per:4d} B={B:3d} T={T:5d} {ms:8.4f} ms  (check {err:.1e})", flush=True)
        setattr(launch, knob, default)
    result = dict(
        command="python bench/recurrent_layouts.py " + out_path,
        device=gpu.stdout.strip(),
        mlx=mx.__version__,
        python=platform.python_version(),
        shape=dict(QWEN, dtype="bfloat16", gating="fused"),
        method="median wall ms per call, mx.eval + mx.synchronize each call, warm-up excluded, 4 input sets rotated",
        rows=rows,
    )
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recurrent_layouts.json")
