"""Per-key fused gates (Kimi Linear's call) against scalar gates (Qwen's), one layer's recurrence.

    python bench/per_key_bench.py [--out FILE.json] [--quick]

For Kimi-like shapes (Hk = Hv = 32, Dk = Dv = 128, bf16) times `gated_delta_update` with
  - scalar gates: a [B, T, Hv], A_log, dt_bias [Hv]
  - per-key gates: a [B, T, Hv, Dk], A_log [Hv, 1], dt_bias [Hv, Dk] (the recurrent kernel; the
    chunked kernels take scalar gates only)
  - mlx-lm 0.32.2's gated_delta_update with the per-key call, where T is small enough (on a
    machine without Metal it runs its ops loop)
Each result is checked against the float64 reference on a small slice before it is timed.
Median wall time per call, synchronised after each call (mlx_gdn.bench.timing).
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
from mlx_gdn.bench.timing import mlx_sync, time_calls  # noqa: E402
from mlx_gdn.reference import delta_rule, gates, rel_error  # noqa: E402
from mlx_gdn.testing import random_inputs  # noqa: E402

H, D = 32, 128


def _args(x, gate):
    """gated_delta_update's positional arguments for inputs x, as the model calls it."""
    if gate == "key":
        return (x.q, x.k, x.v, x.a, x.b, x.A_log.reshape(-1, 1), x.dt_bias, x.state)
    return (x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state)


def _check(gate):
    """The path being timed agrees with the float64 reference on a small case first."""
    x = random_inputs(1, 6, 2, 2, D, D, dtype=mx.bfloat16, seed=1, fused_gate=gate)
    y, s = mlx_gdn.gated_delta_update(*_args(x, gate), lower_bound=-5.0)
    g, beta = gates(x.a, x.b, x.A_log, x.dt_bias, -5.0)
    yr, sr = delta_rule(x.q, x.k, x.v, g, beta, x.state)
    err = max(rel_error(y, yr), rel_error(s, sr))
    assert err < 2e-2, f"{gate}: relative error {err:.2e}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=1.0)
    opts = ap.parse_args()
    try:
        from mlx_lm.models import gated_delta as lm
    except ImportError:
        lm = None
    for gate in ("scalar", "key"):
        _check(gate)
    cells = [(1, 1), (16, 1), (1, 256), (1, 2048), (16, 256)] if not opts.quick else [(1, 1), (1, 64)]
    rows = []
    for B, T in cells:
        for gate in ("scalar", "key"):
            xs = [random_inputs(B, T, H, H, D, D, dtype=mx.bfloat16, seed=s, fused_gate=gate) for s in range(2)]
            mx.eval([a for x in xs for a in _args(x, gate)])
            contenders = {"mlx-gdn": lambda x: mlx_gdn.gated_delta_update(*_args(x, gate), lower_bound=-5.0)}
            if lm is not None and T <= 256 and gate == "key":
                contenders["mlx-lm"] = lambda x: lm.gated_delta_update(*_args(x, gate), lower_bound=-5.0)
            for name, fn in contenders.items():
                r = time_calls([lambda x=x: fn(x) for x in xs], mlx_sync, budget=opts.budget)
                row = dict(B=B, T=T, gate=gate, contender=name, median_ms=1e3 * r["median_s"], reps=r["reps"])
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = dict(device=str(mx.default_device()), mlx=mx.__version__, platform=platform.platform(), H=H, D=D,
               dtype="bfloat16", lower_bound=-5.0, rows=rows)
    if opts.out:
        Path(opts.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
