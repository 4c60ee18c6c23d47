"""Wall time per call, synchronised after each call; the device's copy bandwidth."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List

import mlx.core as mx


def mlx_sync(out) -> None:
    """Finish the work behind an MLX result before the clock stops: submit it, then wait for the
    device's stream, as torch.cuda.synchronize does for torch. (mx.eval would also wait on each
    output's event, which on MLX's CUDA backend ended 0.03-0.12 ms after the stream did.)"""
    mx.async_eval(out)
    mx.synchronize()


def time_calls(calls: List[Callable[[], Any]], sync: Callable[[Any], None], *, budget: float,
               min_reps: int = 3, max_reps: int = 200) -> dict:
    """Median wall time of calls rotated over `calls` (one per pre-generated input set).

    Warm-up (compilation, allocation, caches) is excluded: one call, or three when a call is
    cheap. Then calls repeat until `budget` seconds have passed and at least `min_reps` ran,
    or `max_reps` ran. When one call alone exceeds the budget, `min_reps` is the count.
    """
    n = len(calls)
    t0 = time.perf_counter()
    out = calls[0]()
    sync(out)
    first = time.perf_counter() - t0
    del out
    for i in range(1, 3 if first < budget / 20 else 1):
        out = calls[i % n]()
        sync(out)
        del out
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps:
        t0 = time.perf_counter()
        out = calls[len(times) % n]()
        sync(out)
        times.append(time.perf_counter() - t0)
        del out
        if len(times) >= min_reps and time.perf_counter() - start >= budget:
            break
    return {"median_s": statistics.median(times), "times_s": times, "reps": len(times), "first_call_s": first}


def copy_bandwidth(nbytes: int, budget: float = 1.0, host: bool = False) -> dict:
    """Achieved bandwidth of `y = x + 1` over a float32 array of `nbytes` (read + write once).

    With `host` (a CPU device), NumPy's copy of the same size is measured too and the larger
    figure is the reference: MLX's CPU elementwise ops run well below the memory system.
    """
    n = nbytes // 4
    x = mx.random.uniform(shape=(n,))
    mx.eval(x)
    r = time_calls([lambda: x + 1.0], mlx_sync, budget=budget,
                   min_reps=5, max_reps=50)
    moved = 2 * n * 4
    out = {"op": "mlx x + 1.0 (float32)", "bytes_moved": moved, "median_s": r["median_s"], "reps": r["reps"],
           "GBps": moved / r["median_s"] / 1e9}
    out["mlx_GBps"] = out["GBps"]
    if host:
        import numpy as np

        a = np.random.default_rng(0).random(n, dtype=np.float32)
        b = np.empty_like(a)
        h = time_calls([lambda: np.copyto(b, a)], lambda _: None, budget=budget, min_reps=5, max_reps=50)
        out["host_copy_GBps"] = moved / h["median_s"] / 1e9
        if out["host_copy_GBps"] > out["GBps"]:
            out.update(op="numpy copyto (float32)", median_s=h["median_s"], GBps=out["host_copy_GBps"])
    return out


def alternating_rounds(calls: Dict[str, Callable[[], Any]], sync: Callable[[Any], None], *, rounds: int,
                       round_s: float = 0.05, max_calls: int = 50) -> Dict[str, List[float]]:
    """name -> per-round median seconds per call, the contenders taking turns round by round.

    On a shared or throttling machine, load drifts between rounds and hits every contender alike,
    so ratios taken round by round are steadier than separate timings. Each contender is warmed up
    (one call) first; within a round it repeats until `round_s` seconds or `max_calls` calls; the
    starting contender rotates between rounds.
    """
    names = list(calls)
    for name in names:
        sync(calls[name]())
    out: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times: List[float] = []
            start = time.perf_counter()
            while len(times) < max_calls and (not times or time.perf_counter() - start < round_s):
                t0 = time.perf_counter()
                sync(calls[name]())
                times.append(time.perf_counter() - t0)
            out[name].append(statistics.median(times))
    return out
