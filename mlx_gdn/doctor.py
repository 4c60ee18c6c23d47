"""`python -m mlx_gdn.doctor`: does every path run correctly on this machine, and how fast?

Runs every kernel variant the machine supports at small sizes against the float64 reference
(`mlx_gdn.reference`): recurrent decode and prefill, chunked, fused and precomputed gates,
scalar and per-key gates, masks, lower_bound with allow_neg_eigval, and the drop-in layer's
fused decode step, in float32 and bfloat16, on each backend that runs here (the ops paths
everywhere; Metal on Apple GPUs; CUDA on NVIDIA GPUs; with --simulate also the Metal and CUDA
simulators on the CPU). Each check asks for its backend by name, so a failing kernel is
reported rather than fallen back from. Then it times the Qwen3.5 layer shape (Hk=16, Hv=32,
Dk=Dv=128, B=1) at T=1 and T=512 against mlx-lm's `gated_delta_update` and
`mx.fast.gated_delta_update` where they are installed.

Prints a table and writes a JSON report (device, versions, platform, every result with its
errors) to attach to an issue. Exits 1 when any check fails.
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


@dataclass(frozen=True)
class Case:
    """One check: a path, a flavour of input and a dtype."""

    backend: str  # "metal", "cuda" or "ops"
    where: str  # "device", "simulator" or "cpu"
    path: str  # "decode", "prefill", "chunked", "layer_step" or "layer_step_norm" (with the output norm)
    gating: str  # "fused" or "precomputed"
    gate: str  # "scalar" or "key"
    masked: bool
    options: bool  # lower_bound and allow_neg_eigval (fused gating)
    dtype: str  # "float32" or "bfloat16"

    @property
    def algorithm(self) -> str:
        return "chunked" if self.path == "chunked" else "recurrent"

    @property
    def name(self) -> str:
        where = {"device": "", "simulator": " (sim)", "cpu": ""}[self.where]
        parts = [f"{self.backend}{where}", self.path]
        if not self.path.startswith("layer_step"):
            parts += [self.gating, f"{self.gate}-gate"]
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


def cases(backend: str, where: str, quick: bool) -> List[Case]:
    """Every check for one backend. quick: each flavour in one dtype (alternating) instead of two."""
    out = []
    i = 0
    for path in ("decode", "prefill", "chunked"):
        if backend == "cuda" and where == "simulator" and path != "chunked":
            continue  # the CUDA simulator runs CUDA-only bodies; the shared recurrent bodies run under the Metal one
        for gating in ("precomputed", "fused"):
            for gate in ("scalar", "key") if gating == "precomputed" else ("scalar",):
                for masked in (False, True):
                    for options in (False, True) if gating == "fused" else (False,):
                        dtypes = ("float32", "bfloat16")
                        if quick:
                            dtypes = (dtypes[i % 2],)
                            i += 1
                        out += [Case(backend, where, path, gating, gate, masked, options, d) for d in dtypes]
    if backend != "ops" and not (backend == "cuda" and where == "simulator"):
        for path in ("layer_step", "layer_step_norm"):
            for masked in (False, True):
                for d in ("float32", "bfloat16") if not quick else (("bfloat16",) if masked else ("float32",)):
                    out.append(Case(backend, where, path, "fused", "scalar", masked, False, d))
    return out


def run_case(c: Case, seed: int) -> dict:
    """The result of one check (never raises): errors against the reference, bound, verdict."""
    from .explain import explain
    from .reference import delta_rule, gates, rel_error
    from .testing import random_inputs, tolerance

    dtype = getattr(mx, c.dtype)
    res = {"name": c.name, **asdict(c), "algorithm": c.algorithm, "seed": seed, "ok": False, "status": "fail"}
    t0 = time.perf_counter()
    try:
        if c.path.startswith("layer_step"):
            from .models import decode_step

            # The norm variant with its weight in the model dtype, as a loaded checkpoint has it.
            nd, eps = (dtype, 1e-6) if c.path == "layer_step_norm" else (None, 0.0)
            errs = decode_step.check_step(c.backend, B, 4, HK, HV, DK, DV, dtype, c.masked, seed, nd, eps)
            res.update(y_err=errs[0], conv_err=errs[1], state_err=errs[2])
            res["kernels"] = [str(v) for v in decode_step.variants(c.backend, B, 4, HK, HV, DK, DV, dtype, c.masked,
                                                                   nd, eps)]
            tol = tolerance(dtype)
        else:
            from .api import gated_delta_rule, gated_delta_update

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
                # The API would hand this shape to another backend: nothing of c.backend to check.
                res.update(ok=True, status="skipped", reason="; ".join(plan.reasons[2:]) or plan.backend)
                return res
            y, s = fn(*args, **kw)
            mx.eval(y, s)
            y_ref, s_ref = delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)
            res.update(y_err=rel_error(y, y_ref), state_err=rel_error(s, s_ref))
            tol = tolerance(dtype, matmul=(c.backend, c.algorithm) == ("ops", "chunked"))
        errs = [res[k] for k in ("y_err", "conv_err", "state_err") if k in res]
        res["tol"] = tol
        res["ok"] = all(e < tol for e in errs)  # NaN fails
        res["status"] = "pass" if res["ok"] else "fail"
        if not res["ok"]:
            res["error"] = f"relative error above {tol:.0e} against the float64 reference"
    except Exception as exc:  # noqa: BLE001 -- every failure is a result
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc(limit=8)
    finally:
        res["seconds"] = time.perf_counter() - t0
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
            err = max((r.get(k, 0.0) for k in ("y_err", "conv_err", "state_err")), default=0.0)
            print(f"{r['status']:7s} {r['name']:70s} {err:9.2e} {r.get('error', '')}")
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
        errs = [r[k] for k in ("y_err", "conv_err", "state_err") if k in r]
        tab.add_row(f"[{style[r['status']]}]{r['status']}[/]", r["name"],
                    f"{max(errs):.2e}" if errs else "", f"{r['tol']:.0e}" if "tol" in r else "",
                    (r.get("error") or r.get("reason") or "")[:120])
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
    p.add_argument("--quick", action="store_true", help="each input flavour in one dtype; timing at T=1 only")
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
