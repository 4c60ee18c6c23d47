"""The benchmark loop: for each cell, check every contender, then time the right ones."""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import mlx.core as mx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .check import Checker
from . import gpu_time
from .contenders import Contender, auto_route
from .inputs import floor_bytes, make_inputs, recurrent_flops, set_bytes
from .shapes import Config
from .timing import time_calls


@dataclass
class Settings:
    budget: float = 1.0  # seconds of timed calls per cell and contender
    min_reps: int = 3
    max_reps: int = 200
    max_call: float = 5.0  # skip a cell whose call is predicted slower than this (seconds)
    sets: int = 3  # input sets rotated among
    set_memory: float = 4e9  # bytes all rotated sets may take together
    seed: int = 0
    tolerance: Optional[dict] = None  # dtype -> max relative error; None: check.TOLERANCE
    gpu_time: bool = False  # also read GPU time per call from CUPTI (NVIDIA, torch importable)


def release_memory() -> None:
    """Hand cached device memory back between contenders, so one framework's cache (MLX's after a
    long ops loop, say) does not starve the next contender or the other framework."""
    clear = getattr(mx, "clear_cache", None)
    if clear is not None:
        clear()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _predicted(history: Dict[str, tuple], cont: Contender, cfg: Config) -> Optional[float]:
    """Seconds per call predicted from this contender's last time on the same line, scaled
    linearly in B*T (an upper bound for paths whose cost grows at most linearly)."""
    h = history.get((cont.name, cfg.shape, cfg.dtype))
    if not h:
        return None
    bt, t = h
    return t * (cfg.B * cfg.T) / bt


def run(configs: List[Config], contenders: List[Contender], settings: Settings,
        copy: Optional[dict] = None, progress: bool = True) -> List[dict]:
    """A result dict per (cell, contender), in order. Status is one of: ok (timed), wrong (failed
    the reference check), error (raised), unsupported, skipped (predicted too slow)."""
    checker = Checker(settings.seed, settings.tolerance)
    history: Dict[tuple, tuple] = {}
    results: List[dict] = []
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress, transient=False)
    with bar:
        task = bar.add_task("benchmark", total=len(configs) * len(contenders))
        for cfg in configs:
            n_sets = max(1, min(settings.sets, int(settings.set_memory // max(1, set_bytes(cfg)))))
            sets = None
            auto = auto_route(cfg)
            cell = []
            for cont in contenders:
                bar.update(task, description=f"{cfg.key} | {cont.name}")
                r = {"key": cfg.key, "config": cfg.to_dict(), "contender": cont.name, "family": cont.family,
                     "gating": cont.gating, "bytes": floor_bytes(cfg), "flops": recurrent_flops(cfg),
                     "auto": bool(auto and cont.route == auto and cont.family == "mlx-gdn")}
                cell.append(r)
                reason = cont.unsupported(cfg)
                pred = _predicted(history, cont, cfg)
                if reason:
                    r.update(status="unsupported", reason=reason)
                elif pred is not None and pred > settings.max_call:
                    r.update(status="skipped", reason=f"predicted {pred:.1f} s per call > --max-call {settings.max_call:g}")
                else:
                    v = checker.check(cont, cfg)
                    r["check"] = v
                    if not v["ok"]:
                        r.update(status="error" if v.get("raised") else "wrong", error=v["error"])
                    else:
                        if sets is None:
                            sets = [make_inputs(cfg, settings.seed + 1 + i) for i in range(n_sets)]
                        calls = None
                        release_memory()
                        try:
                            calls = [cont.prepare(s) for s in sets]
                            t = time_calls(calls, cont.sync, budget=settings.budget, min_reps=settings.min_reps,
                                           max_reps=settings.max_reps)
                        except Exception as e:
                            r.update(status="error", error=f"{type(e).__name__} while timing: {e}")
                        else:
                            r.update(status="ok", time_s=t["median_s"], times_s=t["times_s"], reps=t["reps"],
                                     first_call_s=t["first_call_s"], input_sets=n_sets,
                                     GBps=r["bytes"] / t["median_s"] / 1e9,
                                     GFLOPs=r["flops"] / t["median_s"] / 1e9)
                            if copy:
                                r["copy_frac"] = r["GBps"] / copy["GBps"]
                            history[(cont.name, cfg.shape, cfg.dtype)] = (cfg.B * cfg.T, t["median_s"])
                            if settings.gpu_time:
                                g = gpu_time.kernel_times(calls, cont.sync, reps=max(3, min(20, t["reps"])))
                                if g is not None:
                                    r.update(gpu_us=g["gpu_us"], gpu_kernels=g["kernels"], launches=g["launches"])
                        del calls
                bar.advance(task)
            base = next((r for r, c in zip(cell, contenders) if c.baseline and r["status"] == "ok"), None)
            for r in cell:
                if base and r["status"] == "ok":
                    r["speedup"] = base["time_s"] / r["time_s"]
            results.extend(cell)
            del sets
            gc.collect()
            release_memory()
    return results
