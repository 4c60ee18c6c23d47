"""Where `algorithm="auto"` switches from the recurrent to the chunked form, per backend.

The numbers are prompt lengths measured by the benchmark (bench/NOTES.md says with which
command); below them the recurrent path is as fast or faster.
"""

from __future__ import annotations

from .validate import Problem

# Backend -> smallest T at which the chunked form wins. None: never chosen automatically.
# "cuda": H100, bench/cuda_bench.py (bench/NOTES.md, "CUDA / H100"): chunked leads from T=128
# at B=1 in bf16 and ties in float32.
CHUNKED_FROM_T = {"ops": None, "metal": None, "cuda": 128}


def prefers_chunked(backend: str, p: Problem) -> bool:
    """True when the chunked form should run this problem on `backend`."""
    t0 = CHUNKED_FROM_T.get(backend)
    return t0 is not None and p.T >= t0 and p.gate == "scalar"
