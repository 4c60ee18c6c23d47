"""A call's plan: its inputs validated, the backend and algorithm that run it, and each kernel
path tried once before it is planned (`fallback`). Remembered per call signature, so a decode
loop validates and resolves once."""

from __future__ import annotations

from types import ModuleType
from typing import Tuple

from . import backends, fallback
from .validate import Problem


def plan(backend: str, algorithm: str, key, check, options=(False, False, False)) -> Tuple[Problem, ModuleType, str]:
    """(problem, backend module, algorithm) of a call.

    key: the inputs' signature (`validate.rule_key` / `update_key`; None is never remembered);
    check: validates the inputs and returns their Problem (raising on bad input); options: the
    fused options that select kernel variants, (lower_bound given, allow_neg_eigval, dt_bias per key column).
    A kernel path is tried once before it is planned (`fallback.route`): under "auto" a path that
    fails here gives way to the next, an explicit backend raises `fallback.KernelFailure`.
    """
    if key is None:
        return _make_plan(backend, algorithm, check, options)
    return backends.remembered((key, backend, algorithm, backends.table_key()), _make_plan, backend, algorithm, check,
                      options)


def _make_plan(backend, algorithm, check, options):
    p = check()
    mod, algo = backends.resolve(backend, algorithm, p)
    if mod.name != "ops" and p.T > 0:
        mod, algo = fallback.route(backend == "auto", mod, algo, p, *options)
    return p, mod, algo
