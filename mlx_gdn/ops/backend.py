"""Backend "ops": the recurrence (and the chunked form) in plain MLX ops, on any device."""

from __future__ import annotations

from ..backends import prefers_chunked
from ..validate import Problem

name = "ops"


def available() -> bool:
    """Always: MLX ops run on every device."""
    return True


def unavailable_reason() -> str:
    return ""


def supports(p: Problem, algorithm: str) -> bool:
    """Every shape; the chunked form exists once `ops.chunked` is importable."""
    if algorithm == "chunked":
        try:
            from . import chunked  # noqa: F401
        except ImportError:
            return False
    return True


def choose_algorithm(p: Problem) -> str:
    """Recurrent below the measured crossover T, chunked above (bench/NOTES.md)."""
    return "chunked" if prefers_chunked("ops", p) and supports(p, "chunked") else "recurrent"


def variants(p: Problem, algorithm: str, lower: bool = False, neg: bool = False, dt_key: bool = False):
    """No kernels: MLX ops only."""
    return ()


def run(p: Problem, q, k, v, state, mask, *, algorithm, g=None, beta=None, gating=None):
    """(y, state) for validated inputs; `gating` (FusedGating) replaces g, beta when given."""
    if gating is not None:
        g, beta = gating.compute()
    if algorithm == "chunked":
        from .chunked import chunked_rule

        return chunked_rule(q, k, v, g, beta, state, mask)
    from .recurrent import recurrent_rule

    return recurrent_rule(q, k, v, g, beta, state, mask)


def serving_algorithm(p: Problem, s, algorithm: str) -> str:
    """Every serving call, with the algorithm asked for (`ops.serving` says how)."""
    return algorithm


def run_serving(p: Problem, s, q, k, v, state, mask, cu_seqlens, state_indices, *, algorithm, g=None, beta=None,
                gating=None):
    """(y, final states [N,Hv,Dv,Dk], states or None) of a serving call in MLX ops."""
    from .serving import gather_rows, run_serving as run

    if gating is not None:
        g, beta = gating.compute()
    init = gather_rows(state, state_indices) if s.pooled else state
    return run(p, s, q, k, v, g, beta, init, mask, cu_seqlens, algorithm=algorithm)
