"""Backend "cuda": the kernels on MLX's CUDA backend through `mx.fast.cuda_kernel`.

Recurrent: the same bodies as Metal (kernels/recurrent_*.metal, launch specs in `launch`),
compiled with kernels/cuda_prelude.h, which gives CUDA Metal's vocabulary.
Chunked: a CUDA-only tensor-core kernel pair (`cuda.chunked`).
"""

from __future__ import annotations

import sys

import mlx.core as mx

from .. import launch
from ..backends import prefers_chunked
from ..validate import Problem
from ..launch import compact
from .chunked import chunked_variants, run_chunked, supports_chunked
from .kernel import _device, kernel_for_spec, recurrent_header, simulated

name = "cuda"

# The decode body's state in groups of four columns per lane, moved in 16-byte loads and stores
# (GDN_VEC4, `launch.recurrent_spec`). On the H100 at B=16: 31.1 us of GPU time against 33.0 with
# one 4-byte access per column; the calls are even within noise (bench/NOTES.md, "Session 5").
DECODE_VEC4 = True


def available() -> bool:
    """MLX was built with CUDA and sees a CUDA device, or the CUDA simulator is active."""
    return _device() or simulated()


def unavailable_reason() -> str:
    if available():
        return ""
    if not hasattr(mx, "cuda"):
        return "this MLX build has no CUDA backend (install mlx[cuda13])"
    return "no CUDA device (mx.cuda.is_available() is False) and mlx_gdn.sim.simulated_cuda() is not active"


def supports(p: Problem, algorithm: str) -> bool:
    """Whether a CUDA kernel takes this problem; False sends it to the ops backend."""
    if algorithm == "recurrent":
        return launch.supports_recurrent(p)
    if algorithm == "chunked":
        return supports_chunked(p)
    return False


def choose_algorithm(p: Problem) -> str:
    """Chunked from the measured crossover T on (`backends.CHUNKED_FROM_T`), recurrent below it."""
    return "chunked" if prefers_chunked("cuda", p) and supports_chunked(p) else "recurrent"


def variants(p: Problem, algorithm: str, lower: bool = False, neg: bool = False, dt_key: bool = False):
    """The kernel variants (`fallback.Variant`) a call of `algorithm` on `p` launches, in order;
    lower, neg, dt_key: the fused options (lower_bound given, allow_neg_eigval, dt_bias per key column)."""
    from ..fallback import variant

    if algorithm == "chunked":
        return chunked_variants(p, lower=lower, neg=neg, dt_key=dt_key)
    spec = launch.recurrent_spec(p, lower=lower, neg=neg, vec4=DECODE_VEC4, dt_key=dt_key)
    return (variant(spec.name, spec.template, recurrent_header(spec), compact(spec.source())),)


def run_recurrent(p: Problem, q, k, v, state, mask, *, g=None, beta=None, gating=None, path=None):
    """(y, state) from one launch of a shared recurrent body; path "decode"/"prefill"/None."""
    return launch.run_recurrent(
        p, q, k, v, state, mask, kernel_for=kernel_for_spec, g=g, beta=beta, gating=gating, path=path,
        vec4=DECODE_VEC4,
    )


def run(p: Problem, q, k, v, state, mask, *, algorithm, g=None, beta=None, gating=None):
    """(y, state) for validated inputs. `gating` (FusedGating) replaces g, beta when given."""
    if algorithm == "chunked":
        return run_chunked(p, q, k, v, state, mask, g=g, beta=beta, gating=gating)
    return run_recurrent(p, q, k, v, state, mask, g=g, beta=beta, gating=gating)


def serving_algorithm(p: Problem, s, algorithm: str):
    """How this backend runs a serving call (`serving.kernel_serving_algorithm`)."""
    from ..serving import kernel_serving_algorithm

    return kernel_serving_algorithm(p, s, algorithm, sys.modules[__name__])


def saves_states(p: Problem, every: int) -> bool:
    """Whether the chunked kernels take `p` and can return the states after every `every` tokens
    (return_states=every, a multiple of their chunk length)."""
    from .chunked import CHUNK

    return every > 0 and every % CHUNK == 0 and supports(p, "chunked")


def run_states(p: Problem, q, k, v, state, mask, every: int, *, g=None, beta=None, gating=None):
    """(y, final state [B,Hv,Dv,Dk], states [B, T // every, Hv, Dv, Dk]) from the chunked kernels,
    which save the state after every every // CHUNK-th chunk (`saves_states`)."""
    from .chunked import CHUNK

    return run_chunked(p, q, k, v, state, mask, g=g, beta=beta, gating=gating, save_every=every // CHUNK)


def run_serving(p: Problem, s, q, k, v, state, mask, cu_seqlens, state_indices, *, algorithm, g=None, beta=None,
                gating=None):
    """(y, final states [N,Hv,Dv,Dk], states or None) of a serving call, one kernel launch."""
    return launch.run_serving(p, s, q, k, v, state, mask, cu_seqlens, state_indices, kernel_for=kernel_for_spec,
                              g=g, beta=beta, gating=gating, vec4=DECODE_VEC4)
