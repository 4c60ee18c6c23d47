"""`python -m mlx_gdn.doctor`: does every kernel run correctly on this machine, and how fast?

Runs every kernel variant the machine supports at small sizes against the float64 reference
(`mlx_gdn.reference`), on each backend that runs here (the ops paths everywhere; Metal on Apple
GPUs; CUDA on NVIDIA GPUs; with --simulate also the Metal and CUDA simulators on the CPU), in
float32 and bfloat16:
- the forward paths: recurrent decode and prefill, chunked; fused and precomputed gates, scalar and
  per-key gates, masks, lower_bound with allow_neg_eigval;
- the drop-in layers' fused pieces: the T=1 layer step (Qwen's scalar gates, with and without its
  output norm; Kimi's per-key gates with lower_bound and allow_neg_eigval, with and without the
  sigmoid-gated output norm) and the prefill prep and gated-norm launches;
- the chunked backward (`chunked_vjp`) as gradients: against the ops backward
  (`ops.chunked_backward.chunked_vjp`) and by directional derivatives of the float64 reference;
- the serving calls: a state pool read in place (state_indices), return_states="steps",
  return_states=C through the chunked kernels, packed sequences (cu_seqlens) with a pool and
  return_states=C (on Metal one launch pair).
Each check asks for its backend by name, so a failing kernel is reported (with what
``backend="auto"`` runs in its place) rather than fallen back from. Then it times the Qwen3.5
layer shape (Hk=16, Hv=32, Dk=Dv=128, B=1) at T=1 and T=512 against mlx-lm's
`gated_delta_update` and `mx.fast.gated_delta_update` where they are installed.

Prints a table and writes a JSON report (device, versions, platform, every result with its
errors and the kernel variants it launched) to attach to an issue. Exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx

SCHEMA = "mlx-gdn-doctor/1"
# Check sizes: B=2 (batch indexing), GQA (two value heads per key head), head dims the CUDA chunked
# kernels take; T=1 decode, T=9 prefill (past the decode body's 4 steps), T=70 chunked (past one
# 64-step chunk and two 32-step ones).
B, HK, HV, DK, DV = 2, 1, 2, 64, 64
T_FOR = {"decode": 1, "prefill": 9, "chunked": 70}
LOWER_BOUND = -3.0
QWEN = dict(Hk=16, Hv=32, Dk=128, Dv=128)
CONV_K = 4  # the layers' conv width
NORM_EPS = 1e-6
# Serving sizes: a pool with unused rows; return_states=C with C a multiple of both chunk lengths
# (Metal 32, CUDA 64), T past two boundaries; packed sequences longer and shorter than C.
POOL_ROWS = 5
EVERY = 64
T_EVERY = 130
PACKED_LENS = (66, 3, 70)

FORWARD = ("decode", "prefill", "chunked")
LAYER = ("layer_step", "layer_step_norm", "layer_step_sigmoid_norm", "prefill_prep", "gated_norm")
SERVING = ("serving_pool", "serving_steps", "serving_every", "serving_packed")
CHUNKED_PATHS = ("chunked", "backward", "serving_every", "serving_packed")
# What the CUDA simulator runs: CUDA-only bodies (packed sequences on CUDA run their short ones on
# the shared recurrent bodies, which the Metal simulator runs).
CUDA_SIM_PATHS = ("chunked", "backward", "serving_every")
ERROR_KEYS = ("y_err", "conv_err", "state_err")  # the forward and layer-step checks' own fields

# What backend="auto" runs where a kernel variant of these paths fails its trial here: the
# fallback warnings of decode_step, prefill_step and the two chunked backwards say the same
# (tests/test_doctor.py holds each text to its module's source).
INSTEAD = {
    "layer_step": "the unfused layer step",
    "layer_step_norm": "the fused step without the norm, or the unfused step,",
    "layer_step_sigmoid_norm": "the fused step without the norm, or the unfused step,",
    "prefill_prep": "the unfused conv and norms",
    "gated_norm": "rms_norm and the gate",
    ("backward", "metal"): "gradients come from the ops chunked backward instead",
    ("backward", "cuda"): "the ops backward takes its calls",
    **{path: "the ops backend" for path in SERVING},
}


@dataclass(frozen=True)
class Case:
    """One check: a path, a flavour of input and a dtype."""

    backend: str  # "metal", "cuda" or "ops"
    where: str  # "device", "simulator" or "cpu"
    # FORWARD, LAYER ("layer_step_norm": the Qwen output norm, "_sigmoid_norm": the Kimi one),
    # "backward" (the chunked VJP) or SERVING
    path: str
    gating: str  # "fused" or "precomputed"
    gate: str  # "scalar" or "key"
    masked: bool
    options: bool  # lower_bound and allow_neg_eigval (fused gating)
    dtype: str  # "float32" or "bfloat16"

    @property
    def algorithm(self) -> str:
        return "chunked" if self.path in CHUNKED_PATHS else "recurrent"

    @property
    def name(self) -> str:
        where = {"device": "", "simulator": " (sim)", "cpu": ""}[self.where]
        parts = [f"{self.backend}{where}", self.path]
        if self.path not in LAYER:
            parts += [self.gating, f"{self.gate}-gate"]
        elif self.gate == "key":
            parts += ["key-gate"]
        parts += (["masked"] if self.masked else []) + (["lower_bound+neg"] if self.options else []) + [self.dtype]
        return " ".join(parts)


def _targets(simulate: bool) -> List[tuple]:
    """(backend, where, context factory) for every backend that runs here."""
    from . import backends
    from .sim import simulated_cuda, simulated_metal

    out = [("ops", "device" if mx.default_device().type == mx.gpu else "cpu", contextlib.nullcontext)]
    gpu = mx.default_device().type == mx.gpu
    for name in ("metal", "cuda"):
        mod = backends.module(name)
        if gpu and mod is not None and mod.available() and not mod.simulated():
            out.append((name, "device", contextlib.nullcontext))
    if simulate:
        have = {b for b, _, _ in out}
        if "metal" not in have:
            out.append(("metal", "simulator", simulated_metal))
        if "cuda" not in have:
            out.append(("cuda", "simulator", simulated_cuda))
    return out


def _flavours(backend: str, where: str, quick: bool) -> List[tuple]:
    """(path, gating, gate, masked, options) of every check of one backend; quick: the added paths'
    representative subset (the forward paths keep every flavour)."""
    cuda_sim = backend == "cuda" and where == "simulator"
    out = []
    for path in FORWARD:
        for gating in ("precomputed", "fused"):
            for gate in ("scalar", "key") if gating == "precomputed" else ("scalar",):
                for masked in (False, True):
                    for options in (False, True) if gating == "fused" else (False,):
                        out.append((path, gating, gate, masked, options))
    if backend != "ops":
        for path in ("layer_step", "layer_step_norm"):
            out += [(path, "fused", "scalar", False, False), (path, "fused", "scalar", True, False)]
        # Kimi's per-key gates (dt_bias per key column), the fused options, the sigmoid-gated norm.
        added = [("layer_step", "fused", "key", False, False), ("layer_step", "fused", "key", True, True),
                 ("layer_step", "fused", "scalar", False, True),
                 ("layer_step_sigmoid_norm", "fused", "key", False, False),
                 ("layer_step_sigmoid_norm", "fused", "key", True, True),
                 ("prefill_prep", "fused", "scalar", False, False), ("prefill_prep", "fused", "scalar", True, False),
                 ("gated_norm", "fused", "scalar", False, False)]
        keep = {("layer_step", "fused", "key", True, True), ("layer_step_sigmoid_norm", "fused", "key", False, False),
                ("prefill_prep", "fused", "scalar", True, False), ("gated_norm", "fused", "scalar", False, False)}
        out += [f for f in added if not quick or f in keep]
    out += [("backward", "precomputed", "scalar", m, False) for m in ((True,) if quick else (False, True))]
    serving = [("serving_pool", "fused", "scalar", False, False),
               ("serving_steps", "precomputed", "scalar", True, False),
               ("serving_every", "precomputed", "scalar", True, False),
               ("serving_packed", "precomputed", "scalar", False, False)]
    out += [f for f in serving if not quick or f[0] in ("serving_pool", "serving_packed")]
    if cuda_sim:  # the CUDA simulator runs CUDA-only bodies; the shared ones run under the Metal one
        out = [f for f in out if f[0] in CUDA_SIM_PATHS]
    return out


def cases(backend: str, where: str, quick: bool) -> List[Case]:
    """Every check for one backend. quick: each flavour in one dtype (alternating) instead of two,
    and a representative subset of the fused layer pieces, backward and serving flavours."""
    out = []
    for i, f in enumerate(_flavours(backend, where, quick)):
        dtypes = ("float32", "bfloat16")
        out += [Case(backend, where, *f, d) for d in ((dtypes[i % 2],) if quick else dtypes)]
    return out


class _Skip(Exception):
    """This backend would not run the check's call (another path takes the shape)."""


def _forward(c: Case, seed: int, dtype, res: dict) -> None:
    from .api import gated_delta_rule, gated_delta_update
    from .explain import explain
    from .reference import delta_rule, gates, rel_error
    from .testing import random_inputs, tolerance

    x = random_inputs(B, T_FOR[c.path], HK, HV, DK, DV, dtype=dtype, seed=seed, gate=c.gate, mask=c.masked)
    kw = dict(backend=c.backend, algorithm=c.algorithm)
    if c.gating == "fused":
        opts = dict(lower_bound=LOWER_BOUND, allow_neg_eigval=True) if c.options else {}
        fn, args = gated_delta_update, (x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask)
        kw.update(opts)
        g, beta = gates(x.a, x.b, x.A_log, x.dt_bias, opts.get("lower_bound"), bool(opts))
    else:
        fn, args = gated_delta_rule, (x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
        g, beta = x.g, x.beta
    plan = explain(fn, *args, **kw)
    res["kernels"] = [str(v) for v in plan.kernels]
    if plan.backend != c.backend:
        raise _Skip("; ".join(plan.reasons[2:]) or plan.backend)
    if c.backend != "ops":
        from . import backends
        from .fallback import candidates

        mod = backends.module(c.backend)
        rest = candidates(True, mod, c.algorithm, plan.problem)[1:]
        res["fallback"] = " or ".join(f"{m.name} {a}" for m, a in rest)
    y, s = fn(*args, **kw)
    mx.eval(y, s)
    y_ref, s_ref = delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)
    res.update(y_err=rel_error(y, y_ref), state_err=rel_error(s, s_ref))
    res["tol"] = tolerance(dtype, matmul=(c.backend, c.algorithm) == ("ops", "chunked"))


def _layer_step(c: Case, seed: int, dtype, res: dict) -> None:
    from .models import decode_step
    from .testing import tolerance

    gating = decode_step.Gating(key=c.gate == "key", dt_key=c.gate == "key",
                                lower_bound=LOWER_BOUND if c.options else None, neg=c.options)
    # The norm variants with their weight in the model dtype, as a loaded checkpoint has it; the
    # Kimi norm's sigmoid in the gate's dtype, as those layers take it.
    normed = c.path != "layer_step"
    nd, eps = (dtype, NORM_EPS) if normed else (None, 0.0)
    sd = dtype if c.path == "layer_step_sigmoid_norm" else None
    ins = decode_step.random_step_inputs(B, CONV_K, HK, HV, DK, DV, dtype, c.masked, seed, gating)
    norm = decode_step.random_norm(B, HV, DV, dtype, nd, eps, seed, sd) if normed else None
    qkv, cs, w, a, b, A_log, dt_bias, state, mask = ins
    taken = decode_step.fused_backend(c.backend, qkv, cs, w, a, b, state, mask, HK, HV, DK, DV, norm, A_log, dt_bias,
                                      gating.lower_bound, gating.neg)
    res.update(kernels=[str(v) for v in decode_step.variants(c.backend, B, CONV_K, HK, HV, DK, DV, dtype, c.masked,
                                                            nd, eps, gating, sd)])
    if taken != c.backend:
        raise _Skip(f"the fused step does not take this call on {c.backend}; the unfused layer step runs it")
    errs = decode_step.check_step(c.backend, B, CONV_K, HK, HV, DK, DV, dtype, c.masked, seed, nd, eps, gating, sd)
    res.update(y_err=errs[0], conv_err=errs[1], state_err=errs[2], tol=tolerance(dtype))


def _prefill_piece(c: Case, seed: int, dtype, res: dict) -> None:
    from .models import prefill_step as ps
    from .testing import tolerance

    T = T_FOR["prefill"]
    if c.path == "prefill_prep":
        qkv, cs, w, mask = ps.random_prep_inputs(B, T, CONV_K, HK, HV, DK, DV, dtype, c.masked, seed)
        spec = ps.prep_spec(B, T, CONV_K, HK, HV, DK, DV, dtype, c.masked)
        taken = ps.prep_backend(c.backend, qkv, cs, w, mask, HK, HV, DK, DV)
        res["kernels"] = [str(v) for v in ps._variant(c.backend, spec)]
        if taken != c.backend:
            raise _Skip(f"the prep launch does not take this call on {c.backend}")
        eq, ek, ev, econv = ps.check_prep(c.backend, B, T, CONV_K, HK, HV, DK, DV, dtype, c.masked, seed)
        res["errors"] = {"q": eq, "k": ek, "v": ev, "conv_state": econv}
    else:
        N = B * T * HV  # the norm over every value head of a prefill's y
        spec = ps.norm_spec(N, DV, dtype, dtype, dtype, NORM_EPS)
        y = mx.zeros((N, DV), dtype)
        taken = ps.norm_backend(c.backend, y, y, mx.zeros((DV,), dtype), NORM_EPS)
        res["kernels"] = [str(v) for v in ps._variant(c.backend, spec)]
        if taken != c.backend:
            raise _Skip(f"the gated-norm launch does not take this call on {c.backend}")
        res["errors"] = {"out": ps.check_norm(c.backend, N, DV, dtype, dtype, dtype, NORM_EPS, seed)}
    res["tol"] = tolerance(dtype)


GRADS = ("q", "k", "v", "g", "beta", "state")


def _backward(c: Case, seed: int, dtype, res: dict) -> None:
    """The chunked VJP of L = sum(y W) + sum(state V) on `c.backend`'s kernels (ops: the ops
    backward itself): every gradient against the ops backward and by a directional derivative of
    the float64 reference."""
    from .ops.chunked_backward import chunked_vjp as ops_vjp
    from .reference import rel_error
    from .testing import directional_derivatives, loss_weights, random_inputs, tolerance
    from .validate import check_rule

    x = random_inputs(B, T_FOR["chunked"], HK, HV, DK, DV, dtype=dtype, seed=seed, mask=c.masked)
    W, V = loss_weights(x, seed)
    W = W.astype(dtype)  # y's cotangent comes in y's dtype
    args = (x.q, x.k, x.v, x.g, x.beta, x.state, x.mask, W, V)
    p = check_rule(*args[:7])
    res["kernels"] = []
    if c.backend == "metal":
        from .metal import chunked_backward as kb

        res["kernels"] = [str(v) for v in kb.variants(p)]
        if not kb.supports(p):
            raise _Skip("the Metal chunked backward does not take this shape; the ops backward runs it")
        got = kb.kernel_vjp(p, *args)  # the kernels alone: no trial, no fallback
    elif c.backend == "cuda":
        from .cuda import backend as cb_fwd, chunked_backward as kb

        bv = kb._choose_bv(p)
        exact, fwd = p.dtype == mx.float32, kb._forward_problem(p)
        tmpl = f"Dk={p.Dk}, Dv={p.Dv}, EXACT={str(exact).lower()}, MASKED={str(p.masked).lower()}"
        res["kernels"] = [str(v) for v in cb_fwd.variants(fwd, "chunked")] + [
            f"gdn_cuda_chunked_state_backward<{tmpl}, BV={bv}>", f"gdn_cuda_chunked_chunk_grads<{tmpl}>"]
        if not kb.supports(p):
            raise _Skip("the CUDA chunked backward does not take this shape; the ops backward runs it")
        got = kb._run(p, *args)  # the kernels alone: no trial, no fallback
    else:
        got = ops_vjp(*args)
    mx.eval(*got)
    # The ops backward forms its products with mx.matmul (TF32 on a CUDA device): its own results,
    # and the kernels' distance from them, are held to that bound; the kernels' to their dtype's.
    tol = tolerance(dtype, matmul=c.backend == "ops")
    errors, bounds = {}, {}
    if c.backend != "ops":
        want = ops_vjp(*args)
        errors.update({f"d{n} vs ops": rel_error(a, b) for n, a, b in zip(GRADS, got, want)})
        bounds = {k: tolerance(dtype, matmul=True) for k in errors}
    grads = dict(zip(GRADS, got))
    inputs = {n: getattr(x, n) for n in GRADS}
    degenerate = []
    for n, (pred, ref, scale) in directional_derivatives(grads, inputs, x.mask, W, V, seed).items():
        errors[f"d{n} directional"] = abs(pred - ref) / scale if scale > 0 else 0.0
        if not abs(ref) > 1e-6 * scale or scale == 0:
            degenerate.append(n)
    res.update(errors=errors, tol=tol, **({"bounds": bounds} if bounds else {}))
    if degenerate:
        res["error"] = f"degenerate directional check of d{', d'.join(degenerate)} (seed {seed}): cannot fail"


@contextlib.contextmanager
def _recording_launches():
    """A list that fills with the kernel variants (name and template) built from launch specs
    while the block runs: the serving paths pick theirs at run time. Launchers are cached per
    shape, so they are cleared first (and the route's plans with them: explicit backends only)."""
    from . import backends, launch
    from .fallback import variant

    launched: List[str] = []
    real = launch.LaunchSpec.source

    def source(spec):
        name = str(variant(spec.name, spec.template))
        if name not in launched:
            launched.append(name)
        return real(spec)

    backends.clear_plans()
    launch.LaunchSpec.source = source
    try:
        yield launched
    finally:
        launch.LaunchSpec.source = real


def _serving(c: Case, seed: int, dtype, res: dict) -> None:
    from . import backends, serving
    from .api import gated_delta_rule, gated_delta_update
    from .reference import gates, rel_error, to_numpy
    from .testing import serving_inputs, serving_reference, tolerance
    from .validate import check_rule, check_update

    lens, T, every, pool = None, T_FOR["prefill"], 0, 0
    if c.path == "serving_pool":
        T, pool = T_FOR["decode"], POOL_ROWS
    elif c.path == "serving_steps":
        every = "steps"
    elif c.path == "serving_every":
        T, every = T_EVERY, EVERY
    else:
        lens, every, pool = PACKED_LENS, EVERY, POOL_ROWS
    x, state, cu, idx = serving_inputs(lens, B, T, HK, HV, DK, DV, dtype=dtype, seed=seed, gate=c.gate,
                                       masked=c.masked, pool=pool)
    fused = c.gating == "fused"
    if fused:
        p = check_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, None, x.mask, None, False)
    else:
        p = check_rule(x.q, x.k, x.v, x.g, x.beta, None, x.mask)
    s = serving.check_serving(p, state, cu, idx, every or None)
    mod, algo = backends.resolve_serving(c.backend, c.algorithm, p, s)
    res.update(route=f"{mod.name} {algo}", kernels=[])
    if mod.name != c.backend:
        raise _Skip(f"{c.backend} does not take this serving call; {mod.name} {algo} runs it")
    kw = dict(cu_seqlens=cu, state_indices=idx, return_states=every or None, backend=c.backend,
              algorithm=c.algorithm)
    with _recording_launches() as launched:
        res["kernels"] = launched
        if fused:
            out = gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, state, x.mask, **kw)
            g, beta = gates(x.a, x.b, x.A_log, x.dt_bias)
        else:
            out = gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, state, x.mask, **kw)
            g, beta = x.g, x.beta
        mx.eval(*out)
    if c.backend != "ops" and not launched:  # launches not built from a LaunchSpec (CUDA's chunked kernels)
        res["kernels"] = [str(v) for v in mod.variants(p, "recurrent" if algo == "recurrent" else "chunked")]
    y_ref, s_ref, st_ref = serving_reference(x.q, x.k, x.v, g, beta, state, x.mask, cu, idx, every)
    errors = {"y": rel_error(out[0], y_ref), "state": rel_error(out[1], s_ref)}
    if every:
        errors["states"] = rel_error(out[2], st_ref)
    if idx is not None:
        # pool rows no sequence writes are the pool's own, bit for bit
        ids = to_numpy(idx).astype(int)
        untouched = [r for r in range(pool) if r not in set(ids[ids >= 0])]
        errors["untouched pool rows"] = rel_error(out[1][mx.array(untouched)], to_numpy(state)[untouched]) \
            if untouched else 0.0
    res.update(errors=errors, tol=tolerance(dtype))


def _check(c: Case, seed: int, dtype, res: dict) -> None:
    """Run check `c`, filling `res` as it goes (the variants first, so a failure still names them)."""
    if c.path in FORWARD:
        _forward(c, seed, dtype, res)
    elif c.path.startswith("layer_step"):
        _layer_step(c, seed, dtype, res)
    elif c.path in LAYER:
        _prefill_piece(c, seed, dtype, res)
    elif c.path == "backward":
        _backward(c, seed, dtype, res)
    else:
        _serving(c, seed, dtype, res)


def _instead(c: Case, res: dict) -> str:
    # What backend="auto" does where this check's kernels fail (the fallback warning's words).
    if c.backend == "ops":
        return ""
    if c.path in FORWARD:
        return f"backend='auto' runs {res.get('fallback') or 'nothing else'} for it from now on in this process"
    text = INSTEAD.get((c.path, c.backend), INSTEAD.get(c.path))
    if c.path == "backward":
        return f"backend='auto': {text}"
    return f"backend='auto' runs {text} for it from now on in this process"


def run_case(c: Case, seed: int) -> dict:
    """The result of one check (never raises): errors against the reference (and, for gradients,
    the ops backward), bound, verdict, the kernel variants launched, and for a failure what
    backend="auto" runs instead."""
    dtype = getattr(mx, c.dtype)
    res = {"name": c.name, **asdict(c), "algorithm": c.algorithm, "seed": seed, "ok": False, "status": "fail"}
    t0 = time.perf_counter()
    try:
        _check(c, seed, dtype, res)
        errors = res.setdefault("errors", {})
        errors.update({k[:-4]: res[k] for k in ERROR_KEYS if k in res})
        # each error under its bound: the check's `tol`, or one of `bounds` where it names the error
        bound = {k: res.get("bounds", {}).get(k, res["tol"]) for k in errors}
        over = [k for k, e in errors.items() if not e < bound[k]]  # NaN fails
        res["ok"] = bool(errors) and not over and "error" not in res
        if over and "error" not in res:
            res["error"] = "relative error above its bound: " + ", ".join(
                f"{k} {errors[k]:.2e} (bound {bound[k]:.0e})" for k in over)
    except _Skip as skip:
        res.update(ok=True, status="skipped", reason=str(skip))
        return res
    except Exception as exc:  # noqa: BLE001 -- every failure is a result
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc(limit=8)
    finally:
        res["seconds"] = time.perf_counter() - t0
    res["status"] = "pass" if res["ok"] else "fail"
    if not res["ok"]:
        res["instead"] = _instead(c, res)
        if res.get("kernels"):
            res["error"] = f"kernel {' + '.join(res['kernels'])}: {res['error']}"
    return res


def _contenders() -> List[tuple]:
    """(name, make(inputs) -> call) of the timed paths installed here."""
    from .api import gated_delta_update

    out = [("mlx-gdn gated_delta_update (auto)",
            lambda x: lambda: gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state))]
    try:
        from mlx_lm.models import gated_delta as gd

        out.append(("mlx-lm gated_delta_update",
                    lambda x: lambda: gd.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state)))
    except ImportError:
        pass
    fast = getattr(mx.fast, "gated_delta_update", None)
    if fast is not None:
        out.append(("mx.fast.gated_delta_update", lambda x: lambda: fast(x.q, x.k, x.v, x.g, x.beta, x.state)))
    return out


def run_timings(quick: bool, seed: int) -> List[dict]:
    """Median wall time per call of each contender on the Qwen3.5 layer shape, B=1, bf16 on a GPU
    (float32 on the CPU); T=1 and T=512 (T=1 only with quick). Outputs are evaluated and the
    device synchronised after each call."""
    from .explain import explain
    from .api import gated_delta_update
    from .bench.timing import mlx_sync, time_calls
    from .testing import random_inputs

    gpu = mx.default_device().type == mx.gpu
    dtype = mx.bfloat16 if gpu else mx.float32
    rows = []
    for T in (1,) if quick else (1, 512):
        x = random_inputs(1, T, QWEN["Hk"], QWEN["Hv"], QWEN["Dk"], QWEN["Dv"], dtype=dtype, seed=seed)
        route = explain(gated_delta_update, x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state)
        for name, make in _contenders():
            row = {"name": name, "B": 1, "T": T, **QWEN, "dtype": str(dtype).replace("mlx.core.", "")}
            if name.startswith("mlx-gdn"):
                row["route"] = f"{route.backend} {route.algorithm}"
            try:
                r = time_calls([make(x)], mlx_sync, budget=0.2 if quick else 1.0, min_reps=3, max_reps=50)
                row.update(median_ms=r["median_s"] * 1e3, reps=r["reps"], first_call_ms=r["first_call_s"] * 1e3)
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
    return rows


def _print(report: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text without rich
        for r in report["checks"]:
            err = max(r.get("errors", {}).values(), default=0.0)
            note = r.get("error", r.get("reason", ""))
            print(f"{r['status']:7s} {r['name']:70s} {err:9.2e} {note} {r.get('instead', '')}")
        for t in report["timings"]:
            print(f"T={t['T']:<4d} {t['name']:40s} {t.get('median_ms', float('nan')):10.3f} ms {t.get('error', '')}")
        print(report["summary"])
        return
    con = Console()
    con.print(f"[bold]mlx-gdn doctor[/bold]  {report['environment']['device']}  mlx {report['environment']['versions']['mlx']}")
    tab = Table(title="checks against the float64 reference")
    for col in ("status", "check", "max rel. error", "bound", "note"):
        tab.add_column(col)
    style = {"pass": "green", "fail": "bold red", "skipped": "dim"}
    for r in report["checks"]:
        errs = list(r.get("errors", {}).values())
        note = r.get("error") or r.get("reason") or ""
        if r.get("instead"):
            note = f"{note[:300]} -> {r['instead']}"
        tab.add_row(f"[{style[r['status']]}]{r['status']}[/]", r["name"],
                    f"{max(errs):.2e}" if errs else "", f"{r['tol']:.0e}" if "tol" in r else "", note[:400])
    con.print(tab)
    if report["timings"]:
        tt = Table(title="Qwen3.5 layer shape (Hk=16, Hv=32, Dk=Dv=128), B=1: median wall time per call")
        for col in ("T", "path", "ms", "note"):
            tt.add_column(col)
        for t in report["timings"]:
            ms = f"{t['median_ms']:.3f}" if "median_ms" in t else ""
            tt.add_row(str(t["T"]), t["name"], ms, t.get("error", t.get("route", "")))
        con.print(tt)
    s = report["summary"]
    con.print(f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped; report: {report['json_path']}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_gdn.doctor",
        description="Check every mlx-gdn path this machine runs against a float64 reference, time the Qwen3.5 "
                    "layer shape, and write a JSON report to attach to an issue. Exit status 1 when a check fails.",
    )
    p.add_argument("--quick", action="store_true",
                   help="each input flavour in one dtype, a representative subset of the fused layer pieces', "
                        "backward's and serving calls' flavours; timing at T=1 only")
    p.add_argument("--simulate", action="store_true",
                   help="also run the Metal and CUDA kernels in the CPU simulators (slow the first time: C++ builds)")
    p.add_argument("--json", default="mlx_gdn_doctor.json", help="report path (default: %(default)s in the cwd)")
    p.add_argument("--only", action="append", choices=["ops", "metal", "cuda"], help="only this backend (repeatable)")
    p.add_argument("--filter", help="only checks whose name matches this regular expression")
    p.add_argument("--no-timing", action="store_true", help="skip the timing section")
    p.add_argument("--seed", type=int, help="seed of the random inputs (default: a fresh one, recorded)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the doctor; returns the exit status (0 when every check passed)."""
    from . import __version__
    from .bench.env import environment
    from .testing import TOLERANCE, fresh_seed

    args = parser().parse_args(argv)
    seed = fresh_seed() if args.seed is None else args.seed
    pattern = re.compile(args.filter) if args.filter else None
    checks = []
    for backend, where, context in _targets(args.simulate):
        if args.only and backend not in args.only:
            continue
        todo = [c for c in cases(backend, where, args.quick) if pattern is None or pattern.search(c.name)]
        if not todo:
            continue
        with context():
            checks += [run_case(c, seed) for c in todo]
    timings = [] if args.no_timing else run_timings(args.quick, seed)
    failed = sum(r["status"] == "fail" for r in checks)
    env = environment()
    report = {
        "schema": SCHEMA,
        "mlx_gdn_version": __version__,
        "device": env["device"],
        "versions": env["versions"],
        "platform": env["platform"],
        "environment": env,
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "seed": seed,
        "tolerance": {str(k).replace("mlx.core.", ""): v for k, v in TOLERANCE.items()},
        "checks": checks,
        "timings": timings,
        "summary": {"passed": sum(r["status"] == "pass" for r in checks), "failed": failed,
                    "skipped": sum(r["status"] == "skipped" for r in checks)},
        "ok": failed == 0,
        "json_path": str(Path(args.json).resolve()),
    }
    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    _print(report)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
