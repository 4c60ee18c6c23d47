"""GPU time per call, read from CUPTI through torch's profiler (NVIDIA GPUs, torch importable).

Wall time per call mixes the host's launch cost with the GPU's work; this separates them. CUPTI
records every kernel in the process, so MLX's kernels and fla's Triton kernels are timed by the
same clock. Each call is evaluated and synchronised, as in the wall-time loop.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, List, Optional


def available() -> bool:
    """True where torch sees a CUDA device (its profiler then reads CUPTI)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def kernel_times(calls: List[Callable[[], Any]], sync: Callable[[Any], None], reps: int = 20,
                 warm: int = 3) -> Optional[dict]:
    """{"gpu_us": GPU microseconds per call, "kernels": {name: us per call}, "launches": kernels
    per call} over `reps` calls rotated over `calls`, after `warm` calls; None without CUPTI."""
    if not available():
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    for i in range(warm):
        sync(calls[i % len(calls)]())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            sync(calls[i % len(calls)]())
        torch.cuda.synchronize()
    per = defaultdict(float)
    launches = 0
    for ev in prof.events():
        # GPU-side records only: host-side records of launches carry their kernels' time too
        if "CUDA" not in str(getattr(ev, "device_type", "")):
            continue
        per[ev.name[:120]] += ev.time_range.elapsed_us() / reps
        launches += 1
    return {"gpu_us": sum(per.values()), "kernels": dict(per), "launches": launches / reps}
