"""Where `algorithm="auto"` switches from the recurrent to the chunked form, per backend.

The numbers are prompt lengths measured by the benchmark (bench/NOTES.md says with which
command); below them the recurrent path is as fast or faster.
"""

from __future__ import annotations

from .validate import Problem

# Backend -> smallest T at which the chunked form wins. None: never chosen automatically.
# "ops": measured on the 2-core CPU with bench/crossover_cpu.py (bench/NOTES.md, "Chunked
# prefill"): with the machine quiet, chunked leads from T=8 on (ties or trails at T <= 4).
# "metal": no Apple GPU to measure on; NOTES gives a model only. "cuda": H100, bench/cuda_bench.py
# (bench/NOTES.md, "CUDA / H100"): chunked leads from T=128 at B=1 in bf16 and ties in float32.
CHUNKED_FROM_T = {"ops": 8, "metal": None, "cuda": 128}


def prefers_chunked(backend: str, p: Problem) -> bool:
    """True when the chunked form should run this problem on `backend`.

    Scalar gates only: the ops chunked form takes per-key gates exactly, but its pairwise
    decay then has a Dk axis (C*C*Dk exponentials per chunk and head), and it measured slower
    than the recurrence (bench/NOTES.md, "Chunked prefill"); a folded form (decay split between K and Q columns) overflows for
    gates near 0 unless they are bounded below.
    """
    t0 = CHUNKED_FROM_T.get(backend)
    return t0 is not None and p.T >= t0 and p.gate == "scalar"
