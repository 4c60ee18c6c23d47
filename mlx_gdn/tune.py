"""Measure, on this machine, where each backend's chunked form beats its recurrent one.

    python -m mlx_gdn.tune            # a few minutes; writes the tuning file
    python -m mlx_gdn.tune --quick    # under a minute, coarser
    python -m mlx_gdn.tune --show     # what is stored, and whether it applies here
    python -m mlx_gdn.tune --reset    # forget this device's results

For every backend that runs here (`available_backends()`) and each dtype, both algorithms run
through the public `gated_delta_update` on a model layer's shape (Qwen3.5: Hk=16, Hv=32,
Dk=Dv=128, B=1) with gates like a trained layer's (`bench.inputs.make_inputs`), for prompt lengths
T = 1, 2, 4, ... The two take turns round by round (`bench.timing.alternating_rounds`), so load
changes hit both alike. The crossover is the smallest measured T from which the chunked form is
faster at that T and every larger one measured; never, if it does not win at the largest. The
result goes to the tuning file (`tuning.cache_path()`), keyed by device and stamped with the MLX
and mlx-gdn versions; `algorithm="auto"` then uses it on this device (see docs/tuning.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx

from . import backends, tuning
from .api import gated_delta_update
from .bench.inputs import make_inputs
from .bench.shapes import PRESETS, Config
from .bench.timing import alternating_rounds, mlx_sync
from .validate import Problem

DTYPES = ("float32", "bfloat16")
# (rounds, largest T) per (device kind, quick). On the 2-core CPU at load 2-5: 26 s with 3 rounds
# (so about a minute with 7), 7 s for --quick with 2 (about 10 s with 3); single runs with 2-3
# rounds there put the crossover anywhere from 16 to 512, hence the extra rounds.
PLANS = {
    ("cpu", False): (7, 512),
    ("cpu", True): (3, 128),
    ("gpu", False): (7, 4096),
    ("gpu", True): (3, 2048),
}


def ladder(t_max: int, quick: bool) -> List[int]:
    """Prompt lengths to measure: powers of two up to t_max (every other one when quick)."""
    step = 4 if quick else 2
    out, t = [], 1
    while t <= t_max:
        out.append(t)
        t *= step
    if out[-1] != t_max:
        out.append(t_max)
    return out


def _problem(shape: Tuple[int, int, int, int], B: int, T: int, dtype: str) -> Problem:
    Hk, Hv, Dk, Dv = shape
    return Problem(B, T, Hk, Hv, Dk, Dv, getattr(mx, dtype), "scalar", False, True)


def time_paths(backend: str, shape, B: int, T: int, dtype: str, rounds: int) -> Dict[str, float]:
    """Median seconds per call of each algorithm `backend` runs for this cell (fused gates)."""
    Hk, Hv, Dk, Dv = shape
    cfg = Config("tune", B, T, Hk, Hv, Dk, Dv, dtype)
    mod = backends.module(backend)
    p = _problem(shape, B, T, dtype)
    sets = [make_inputs(cfg, 1), make_inputs(cfg, 2)]
    calls = {}
    for algo in ("recurrent", "chunked"):
        if not mod.supports(p, algo):
            continue
        turn = [0]

        def call(algo=algo, turn=turn):
            turn[0] += 1
            s = sets[turn[0] % 2]
            return gated_delta_update(s.q, s.k, s.v, s.a, s.b, s.A_log, s.dt_bias, s.state,
                                      backend=backend, algorithm=algo)

        calls[algo] = call
    rounds_s = alternating_rounds(calls, mlx_sync, rounds=rounds)
    return {a: statistics.median(ts) for a, ts in rounds_s.items()}


def crossover_from(times: Dict[int, Dict[str, float]]) -> Optional[int]:
    """Smallest T from which chunked is faster at every measured T, or None."""
    t0 = None
    for T in sorted(times, reverse=True):
        cell = times[T]
        if "chunked" in cell and "recurrent" in cell and cell["chunked"] < cell["recurrent"]:
            t0 = T
        else:
            break
    return t0


def measure(backend_names: Sequence[str], dtypes: Sequence[str], Ts: Sequence[int], rounds: int,
            shape=PRESETS["qwen3.5"], B: int = 1, log: Callable[[str], None] = print) -> dict:
    """Measure every backend x dtype over Ts; the tuning entry (without versions)."""
    result = {}
    for backend in backend_names:
        per_dtype = {}
        for dtype in dtypes:
            times = {}
            for T in Ts:
                t = time_paths(backend, shape, B, T, dtype, rounds)
                times[T] = t
                log(f"  {backend:6s} {dtype:9s} T={T:<5d} " + "  ".join(f"{a} {s * 1e3:9.3f} ms" for a, s in t.items()))
            t0 = crossover_from(times)
            per_dtype[dtype] = {
                "chunked_from_t": t0,
                "times_ms": {str(T): {a: s * 1e3 for a, s in t.items()} for T, t in times.items()},
            }
            log(f"  {backend} {dtype}: chunked from T={t0}" if t0 is not None else f"  {backend} {dtype}: never chunked")
        result[backend] = per_dtype
    Hk, Hv, Dk, Dv = shape
    return {
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "shape": {"B": B, "Hk": Hk, "Hv": Hv, "Dk": Dk, "Dv": Dv},
        "T": list(Ts),
        "rounds": rounds,
        "backends": result,
    }


def run(*, quick: bool = False, backend_names: Optional[Iterable[str]] = None, dtypes: Sequence[str] = DTYPES,
        Ts: Optional[Sequence[int]] = None, rounds: Optional[int] = None, shape=PRESETS["qwen3.5"], B: int = 1,
        output=None, log: Callable[[str], None] = print) -> dict:
    """Measure and store this device's entry; returns it. Defaults by device kind (PLANS)."""
    kind = "gpu" if mx.default_device().type == mx.gpu else "cpu"
    plan_rounds, t_max = PLANS[(kind, quick)]
    names = list(backend_names) if backend_names else list(backends.available_backends())
    Ts = list(Ts) if Ts else ladder(t_max, quick)
    device = tuning.device_name()
    log(f"tuning {device}: backends {', '.join(names)}, dtypes {', '.join(dtypes)}, T {Ts}")
    entry = measure(names, dtypes, Ts, rounds or plan_rounds, shape, B, log)
    path = tuning.write_entry(entry, output, device)
    log(f"written to {path}")
    return entry


def show(path=None, out=sys.stdout) -> None:
    """Print the tuning file, marking the entry that applies to this process."""
    p = path or tuning.cache_path()
    data = tuning.read(p)
    here, vers = tuning.device_name(), tuning.versions()
    print(f"tuning file: {p}" + ("" if data["devices"] else " (no entries)"), file=out)
    for dev, entry in sorted(data["devices"].items()):
        applies = dev == here and all(entry.get(k) == v for k, v in vers.items())
        why = "applies here" if applies else ("other device" if dev != here else "other versions")
        print(f"{dev}: mlx {entry.get('mlx')}, mlx-gdn {entry.get('mlx_gdn')}, measured {entry.get('measured')} "
              f"({why})", file=out)
        for backend, per_dtype in sorted(entry.get("backends", {}).items()):
            for dtype, cell in sorted(per_dtype.items()):
                t0 = cell.get("chunked_from_t")
                print(f"  {backend} {dtype}: " + (f"chunked from T={t0}" if t0 is not None else "never chunked"),
                      file=out)
    print(f"this process: {here}, mlx {vers['mlx']}, mlx-gdn {vers['mlx_gdn']}", file=out)
    if Path(p) != tuning.cache_path():
        print(f"(algorithm='auto' reads {tuning.cache_path()}, not this file)", file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlx_gdn.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer lengths and rounds (under a minute)")
    ap.add_argument("--backends", nargs="*", default=None, help="default: every backend available here")
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    ap.add_argument("--T", type=int, nargs="*", default=None, help="prompt lengths (default: powers of two)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--shape", choices=sorted(PRESETS), default="qwen3.5")
    ap.add_argument("--output", default=None, help="tuning file (default: $MLX_GDN_CACHE or ~/.cache/mlx_gdn)")
    ap.add_argument("--show", action="store_true", help="print the stored results and exit")
    ap.add_argument("--reset", action="store_true", help="forget this device's results and exit")
    ap.add_argument("--json", action="store_true", help="print the new entry as JSON")
    a = ap.parse_args(argv)
    if a.show:
        show(a.output)
        return 0
    if a.reset:
        removed = tuning.remove(a.output)
        print(f"{tuning.device_name()}: " + ("results removed" if removed else "no results stored"))
        return 0
    for b in a.backends or ():
        if not backends.is_available(b):
            ap.error(f"backend {b!r} is not available here; available: {', '.join(backends.available_backends())}")
    entry = run(quick=a.quick, backend_names=a.backends, dtypes=a.dtypes, Ts=a.T, rounds=a.rounds,
                shape=PRESETS[a.shape], output=a.output)
    if a.json:
        print(json.dumps(entry, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
