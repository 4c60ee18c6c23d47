"""Which backend and algorithm run a call: availability, choice, fallback."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Tuple

import mlx.core as mx

from . import tuning
from .validate import ALGORITHMS, BACKENDS, Problem, check_choice

# Each backend module provides: name, available(), unavailable_reason(), supports(p, algorithm),
# choose_algorithm(p), variants(p, algorithm, lower, neg, dt_key) (the kernel variants a call launches,
# `fallback.Variant`; empty for ops), run(p, q, k, v, state, mask, *, algorithm, g, beta, gating), and for
# serving calls serving_algorithm(p, s, algorithm) (the algorithm it runs them with, or None)
# and run_serving(p, s, q, k, v, state, mask, cu_seqlens, state_indices, *, algorithm, g, beta, gating).
_MODULES = {"metal": "mlx_gdn.metal.backend", "cuda": "mlx_gdn.cuda.backend", "ops": "mlx_gdn.ops.backend"}
# Order in which "auto" tries the GPU backends.
_GPU_ORDER = ("metal", "cuda")


# Where `algorithm="auto"` switches from the recurrent to the chunked form, per backend: prompt
# lengths measured by the benchmark (bench/NOTES.md says with which command); below them the
# recurrent path is as fast or faster.
# Backend -> smallest T at which the chunked form wins (or dtype name -> that T). None: never
# chosen automatically. A tuning file for this device (`python -m mlx_gdn.tune`, `tuning`) overrides it.
# "ops": the 2-core CPU, bench/crossover_cpu.py with a trained layer's gates (bench/NOTES.md,
# "CPU crossover with trained gates"): in float32 the chunked form leads from T=128; in bf16 the
# recurrence still led at T=128 (0.76 against 1.04 of mlx-lm's time, alternating rounds on the
# quiet machine) and the chunked form from T=256. "metal": no Apple GPU to measure on; NOTES gives a model only (a tuning
# run decides). "cuda": H100 (bench/NOTES.md, "CUDA / H100"): chunked leads
# from T=128 at B=1 in bf16 and ties in float32.
CHUNKED_FROM_T = {"ops": {"float32": 128, "bfloat16": 256, "float16": 256}, "metal": None, "cuda": 128}


def prefers_chunked(backend: str, p: Problem) -> bool:
    """True when the chunked form should run this problem on `backend`.

    Scalar gates only: the ops chunked form takes per-key gates exactly, in a pairwise form
    (a Dk axis on the decay, C*C*Dk exponentials per chunk and head) and a folded one (decay
    split between K and Q columns relative to sub-chunk boundaries, `ops.chunked._kkt_key_folded`);
    both measured slower than the recurrence on the CPU (the folded one less so), and no
    per-key chunked kernel is measured faster than the recurrent kernel at T=4096 yet.
    algorithm="chunked" runs them.
    """
    t0 = chunked_from(backend, p.dtype)
    return t0 is not None and p.T >= t0 and p.gate == "scalar"


def chunked_from(backend: str, dtype: mx.Dtype):
    """Smallest T at which `algorithm="auto"` runs `backend`'s chunked form for inputs of `dtype`
    (None: never): this device's tuning result where there is one, else CHUNKED_FROM_T."""
    name = str(dtype).rsplit(".", 1)[-1]
    found, t0 = tuning.crossover(backend, name)
    return t0 if found else builtin_chunked_from(backend, name)


def builtin_chunked_from(backend: str, dtype_name: str):
    """CHUNKED_FROM_T's answer for `backend` and a dtype name ("float32", "bfloat16", ...)."""
    t0 = CHUNKED_FROM_T.get(backend)
    return t0.get(dtype_name) if isinstance(t0, dict) else t0


def table_key():
    return tuple((b, tuple(sorted(t.items())) if isinstance(t, dict) else t) for b, t in CHUNKED_FROM_T.items())


# Backend name -> why its module could not be imported (reported when it is asked for).
_IMPORT_ERRORS: dict = {}


def module(name: str) -> ModuleType | None:
    """The backend's module, or None where it cannot be imported here.

    A backend whose module fails to import must not take the others down with it, so any
    exception is kept and reported when that backend is asked for by name.
    """
    mod = sys.modules.get(_MODULES[name])
    if mod is not None:  # the per-call path: no import machinery once loaded
        return mod
    try:
        return importlib.import_module(_MODULES[name])
    except Exception as exc:  # noqa: BLE001
        _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
        return None


def is_available(name: str) -> bool:
    """True when backend `name` can run on this machine now."""
    mod = module(name)
    return mod is not None and bool(mod.available())


def available_backends() -> Tuple[str, ...]:
    """Names of the backends that can run here (ops always)."""
    return tuple(n for n in ("metal", "cuda", "ops") if is_available(n))


def _default_is_gpu() -> bool:
    return mx.default_device().type == mx.gpu


def resolve(backend: str, algorithm: str, p: Problem) -> Tuple[ModuleType, str]:
    """(backend module, algorithm) that will run problem `p`.

    Raises ValueError for an unknown or unavailable backend or algorithm. Shapes a kernel
    cannot take go to the ops backend with the same algorithm.
    """
    check_choice("algorithm", algorithm, ALGORITHMS)
    name = pick_backend(backend)
    mod = module(name)
    algo = mod.choose_algorithm(p) if algorithm == "auto" else algorithm
    if mod.supports(p, algo):
        return mod, algo
    ops = module("ops")
    if ops.supports(p, algo):
        return ops, algo
    raise ValueError(f"algorithm {algo!r} is not available for this input (backend {name!r})")


def resolve_serving(backend: str, algorithm: str, p: Problem, s) -> Tuple[ModuleType, str]:
    """(backend module, algorithm) that runs a serving call (`validate.Serving` s).

    Each backend's `serving_algorithm(p, s, algorithm)` says which of its algorithms runs the
    call (None: it cannot); on Metal and CUDA see `serving.kernel_serving_algorithm`. Otherwise
    the ops backend runs it.
    """
    check_choice("algorithm", algorithm, ALGORITHMS)
    mod = module(pick_backend(backend))
    algo = mod.choose_algorithm(p) if algorithm == "auto" else algorithm
    run_algo = mod.serving_algorithm(p, s, algo)
    if run_algo is not None:
        return mod, run_algo
    ops = module("ops")
    return ops, ops.serving_algorithm(p, s, algo)


def pick_backend(backend: str) -> str:
    """The backend name `backend` ("auto" or a name) stands for here, before shapes are looked at.

    "auto": the first GPU backend available with the default device a GPU (or its simulator
    active), else "ops". A name: itself, or ValueError when it is not available.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        name = "ops"
        for cand in _GPU_ORDER:
            mod = module(cand)
            if mod is not None and mod.available() and (_default_is_gpu() or getattr(mod, "simulated", lambda: False)()):
                name = cand
                break
    else:
        name = backend
        mod = module(name)
        if mod is None or not mod.available():
            reason = _IMPORT_ERRORS.get(name, "") if mod is None else mod.unavailable_reason()
            raise ValueError(
                f"backend {name!r} is not available on this machine"
                + (f" ({reason})" if reason else "")
                + f"; available: {', '.join(available_backends())}"
            )
    return name


# What a call runs, remembered: (key, default device type) -> answer. Within one process the
# answers depend on nothing else but which backends are available, and that changes only when a
# simulator is entered or left (`mlx_gdn.sim` then calls `clear_plans`). So a decode loop
# validates and resolves once, and each step pays for its key and one lookup. Errors are not
# remembered: bad input raises every time.
_PLANS: dict = {}
_PLANS_MAX = 4096
_MISSING = object()
# Caches of other modules that hold answers or kernel objects made under the same conditions.
_CLEARERS: list = [_PLANS.clear]


def remembered(key, make, *args):
    """make(*args), remembered under `key` and the default device type until `clear_plans`."""
    full = (key, mx.default_device().type)
    hit = _PLANS.get(full, _MISSING)
    if hit is _MISSING:
        hit = make(*args)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[full] = hit
    return hit


def on_clear(clear):
    """Register `clear()` to run with `clear_plans` (for caches that depend on the same things)."""
    _CLEARERS.append(clear)
    return clear


def clear_plans() -> None:
    """Forget everything remembered about routes and launches (backend availability changed, or
    a test replaced a backend module)."""
    for clear in _CLEARERS:
        clear()


tuning.on_reload(clear_plans)
