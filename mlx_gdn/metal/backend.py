"""Backend "metal": the recurrent kernels through `mx.fast.metal_kernel`, chunked in `metal.chunked`.

Runs on Apple GPUs, and on the CPU inside `mlx_gdn.sim.simulated_metal()`, which swaps
`mx.fast.metal_kernel` for its simulator; the launch code is the same in both.
"""

from __future__ import annotations

import sys

import mlx.core as mx

from .. import launch
from ..backends import prefers_chunked
from ..validate import Problem
from . import chunked_backward  # the chunked backward as kernels: autodiff takes it where it supports a call
from .kernel import kernel, simulated

name = "metal"

# The decode body's state columns in groups of four per lane (GDN_VEC4, `launch.recurrent_spec`).
# Off on Metal, whose layout is unmeasured on Apple GPUs; the simulator tests switch it on to
# check the column arithmetic that CUDA's 16-byte loads rely on.
DECODE_VEC4 = False

def available() -> bool:
    """A Metal GPU is present, or the simulator is active."""
    return bool(mx.metal.is_available()) or simulated()


def unavailable_reason() -> str:
    if available():
        return ""
    return "no Metal GPU here (mx.metal.is_available() is False) and mlx_gdn.sim.simulated_metal() is not active"


def _supports_chunked(p: Problem) -> bool:
    try:
        from .chunked import supports_chunked
    except ImportError:
        return False
    return bool(supports_chunked(p))


def supports(p: Problem, algorithm: str) -> bool:
    """Whether a Metal kernel takes this problem; False sends it to the ops backend."""
    if algorithm == "chunked":
        return _supports_chunked(p)
    if algorithm == "recurrent":
        return launch.supports_recurrent(p)
    return False


def choose_algorithm(p: Problem) -> str:
    """Chunked from the measured crossover T on (`backends.CHUNKED_FROM_T`), recurrent below it."""
    return "chunked" if prefers_chunked("metal", p) and _supports_chunked(p) else "recurrent"


def variants(p: Problem, algorithm: str, lower: bool = False, neg: bool = False, dt_key: bool = False):
    """The kernel variants (`fallback.Variant`) a call of `algorithm` on `p` launches, in order;
    lower, neg, dt_key: the fused options (lower_bound given, allow_neg_eigval, dt_bias per key column)."""
    from ..fallback import variant

    if algorithm == "chunked":
        from .chunked import launch_specs

        specs = launch_specs(p, lower=lower, neg=neg, dt_key=dt_key)
    else:
        specs = (launch.recurrent_spec(p, lower=lower, neg=neg, vec4=DECODE_VEC4, dt_key=dt_key),)
    return tuple(variant(s.name, s.template, s.header(), s.source()) for s in specs)


def run_recurrent(p: Problem, q, k, v, state, mask, *, g=None, beta=None, gating=None, path=None):
    """(y, state) from one recurrent kernel launch; path "decode"/"prefill" or None (by T)."""
    return launch.run_recurrent(p, q, k, v, state, mask, kernel_for=kernel, g=g, beta=beta, gating=gating, path=path,
                                vec4=DECODE_VEC4)


def run(p: Problem, q, k, v, state, mask, *, algorithm, g=None, beta=None, gating=None):
    """(y, state) for validated inputs. `gating` (FusedGating) replaces g, beta when given."""
    if algorithm == "chunked":
        from .chunked import run_chunked

        return run_chunked(p, q, k, v, state, mask, g=g, beta=beta, gating=gating)
    return run_recurrent(p, q, k, v, state, mask, g=g, beta=beta, gating=gating)


def serving_algorithm(p: Problem, s, algorithm: str):
    """How this backend runs a serving call (`serving.kernel_serving_algorithm`)."""
    from ..serving import kernel_serving_algorithm

    return kernel_serving_algorithm(p, s, algorithm, sys.modules[__name__])


def saves_states(p: Problem, every: int) -> bool:
    """Whether the chunked kernels take `p` and can return the states after every `every` tokens
    (return_states=every, a multiple of their chunk length)."""
    if not _supports_chunked(p):
        return False
    from .chunked import saves_states as saves

    return saves(p, every)


def run_states(p: Problem, q, k, v, state, mask, every: int, *, g=None, beta=None, gating=None):
    """(y, final state [B,Hv,Dv,Dk], states [B, T // every, Hv, Dv, Dk]) from the chunked kernels,
    which save the state after every every // CHUNK-th chunk (`saves_states`)."""
    from .chunked import CHUNK, run_chunked

    return run_chunked(p, q, k, v, state, mask, g=g, beta=beta, gating=gating, save_every=every // CHUNK)


def packs(p: Problem, s) -> bool:
    """Whether the chunked kernels take serving call `s`'s packed sequences in one launch pair
    (`chunked.run_packed`; with return_states=C, C a multiple of their chunk length)."""
    if not _supports_chunked(p):
        return False
    from .chunked import packs as fits

    return fits(p, s.N, s.every)


def run_packed(p: Problem, s, q, k, v, state, mask, cu_seqlens, state_indices, *, g=None, beta=None, gating=None):
    """(y, final states [N,Hv,Dv,Dk], states or None) of packed sequences on the chunked kernels,
    one launch pair; state: the pool (with state_indices) or the initial states [N,Hv,Dv,Dk]."""
    from .chunked import run_packed as run

    return run(p, q, k, v, state, mask, cu_seqlens, state_indices if s.pooled else None, every=s.every, g=g,
               beta=beta, gating=gating)


def run_serving(p: Problem, s, q, k, v, state, mask, cu_seqlens, state_indices, *, algorithm, g=None, beta=None,
                gating=None):
    """(y, final states [N,Hv,Dv,Dk], states or None) of a serving call, one kernel launch."""
    return launch.run_serving(p, s, q, k, v, state, mask, cu_seqlens, state_indices, kernel_for=kernel, g=g,
                              beta=beta, gating=gating, vec4=DECODE_VEC4)
