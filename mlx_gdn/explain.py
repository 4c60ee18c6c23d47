"""Which path a call would take, and why, without running it.

    mlx_gdn.explain(mlx_gdn.gated_delta_update, q, k, v, a, b, A_log, dt_bias, state, backend="auto")

takes an entry point and exactly the arguments of a call to it. The arguments are validated as
the call validates them (bad input raises the same errors) and the route is worked out as the
call works it out (`backends.resolve`, then `fallback`'s verdicts), but no kernel is built or
launched and nothing is remembered.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import List, Tuple

from . import backends, fallback
from .validate import Problem, check_rule, check_update


@dataclass(frozen=True)
class Explanation:
    """The route of one call.

    backend: "metal", "cuda" or "ops"; algorithm: "recurrent" or "chunked"; kernels: the kernel
    variants launched in order (empty on the ops backend); reasons: why, one line each;
    problem: the validated sizes and flavour of the call.
    """

    backend: str
    algorithm: str
    kernels: Tuple[fallback.Variant, ...]
    reasons: Tuple[str, ...]
    problem: Problem = field(repr=False)

    def as_dict(self) -> dict:
        """Plain data (JSON-serialisable): backend, algorithm, kernels (name, template, source hash),
        reasons and the problem's sizes."""
        p = self.problem
        return {
            "backend": self.backend,
            "algorithm": self.algorithm,
            "kernels": [
                {"name": v.name, "template": {k: _plain(x) for k, x in v.template}, "source_hash": v.source_hash}
                for v in self.kernels
            ],
            "reasons": list(self.reasons),
            "problem": {"B": p.B, "T": p.T, "Hk": p.Hk, "Hv": p.Hv, "Dk": p.Dk, "Dv": p.Dv,
                        "dtype": fallback._show(p.dtype), "gate": p.gate, "masked": p.masked, "fused": p.fused},
        }

    def __str__(self) -> str:
        lines = [f"backend {self.backend}, algorithm {self.algorithm}"]
        lines += [f"  kernel {v}" for v in self.kernels]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def explain(fn, *args, **kwargs) -> Explanation:
    """The route `fn(*args, **kwargs)` would take: fn is `mlx_gdn.gated_delta_rule` or
    `mlx_gdn.gated_delta_update`, the arguments those of the call. Launches nothing."""
    from .api import gated_delta_rule, gated_delta_update

    if fn not in (gated_delta_rule, gated_delta_update):
        raise TypeError(
            f"fn must be mlx_gdn.gated_delta_rule or mlx_gdn.gated_delta_update, got {getattr(fn, '__name__', fn)!r}"
        )
    bound = inspect.signature(fn).bind(*args, **kwargs)  # TypeError for arguments the call would refuse
    bound.apply_defaults()
    a = bound.arguments
    if fn is gated_delta_rule:
        p = check_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], a["state"], a["mask"])
        lower = neg = dt_key = False
    else:
        p = check_update(a["q"], a["k"], a["v"], a["a"], a["b"], a["A_log"], a["dt_bias"], a["state"], a["mask"],
                         a["lower_bound"], a["allow_neg_eigval"])
        from .api import _dt_per_key

        lower, neg = a["lower_bound"] is not None, bool(a["allow_neg_eigval"])
        dt_key = _dt_per_key(a["a"], a["dt_bias"])
    return route(a["backend"], a["algorithm"], p, lower, neg, dt_key)


def route(backend: str, algorithm: str, p: Problem, lower: bool = False, neg: bool = False,
          dt_key: bool = False) -> Explanation:
    """The Explanation of a validated problem `p` under `backend` and `algorithm`."""
    mod, algo = backends.resolve(backend, algorithm, p)  # ValueError as the call raises it
    reasons: List[str] = []
    name = backends.pick_backend(backend)
    chosen = backends.module(name)
    if backend == "auto":
        if name == "ops":
            reasons.append("backend 'auto': no Metal or CUDA device is the default device here (nor a simulator active)")
        else:
            sim = " (simulated)" if getattr(chosen, "simulated", lambda: False)() else ""
            reasons.append(f"backend 'auto': {name}{sim} is available")
    else:
        reasons.append(f"backend {backend!r} asked for")
    reasons.append(_algorithm_reason(algorithm, name, chosen, p, algo))
    if mod is not chosen:
        reasons.append(f"unsupported shape: no {name} {algo} kernel takes {_shape(p)}; the ops backend runs it")
    if p.T == 0:
        return Explanation(mod.name, algo, (), tuple(reasons + ["T=0: nothing runs; y is empty, the state comes back"]), p)
    if mod.name != "ops":
        auto = backend == "auto"
        for m, a in fallback.candidates(auto, mod, algo, p):
            if m.name == "ops":
                mod, algo = m, a
                break
            vs, bad, decided = fallback.known(m, a, p, lower, neg, dt_key)
            if bad is None:
                mod, algo = m, a
                if auto and not decided:
                    reasons.append("not yet tried in this process: the first call runs these kernels once on small "
                                   "inputs against the float64 reference, and falls back if they fail")
                break
            if not auto:
                raise fallback.KernelFailure(
                    f"kernel {fallback.describe(vs)} (backend {m.name!r}, algorithm {a!r}) failed on this device: {bad}"
                )
            reasons.append(f"fallback: kernel {fallback.describe(vs)} failed on this device earlier ({bad})")
    return Explanation(mod.name, algo, tuple(mod.variants(p, algo, lower, neg, dt_key)), tuple(reasons), p)


def _algorithm_reason(algorithm: str, name: str, chosen, p: Problem, algo: str) -> str:
    if algorithm != "auto":
        return f"algorithm {algorithm!r} asked for"
    t0 = backends.chunked_from(name, p.dtype)
    if p.gate != "scalar":
        return "algorithm 'auto': per-key gates run the recurrent form (chunked only when asked for)"
    if t0 is None:
        return f"algorithm 'auto': no crossover measured for {name} (CHUNKED_FROM_T or a tuning file), so recurrent"
    if p.T < t0:
        return f"algorithm 'auto': crossover: T={p.T} below the crossover T={t0} for {name}, so recurrent"
    if algo == "recurrent":
        return (f"algorithm 'auto': T={p.T} reaches the crossover T={t0} for {name}, but no {name} chunked kernel "
                "takes this shape, so recurrent")
    return f"algorithm 'auto': crossover: T={p.T} reaches the crossover T={t0} for {name}, so chunked"


def _plain(v):
    return v if isinstance(v, (bool, int, float, str)) else fallback._show(v)


def _shape(p: Problem) -> str:
    return (f"B={p.B} T={p.T} Hk={p.Hk} Hv={p.Hv} Dk={p.Dk} Dv={p.Dv} {fallback._show(p.dtype)} "
            f"{p.gate} gates{' masked' if p.masked else ''}")
