"""`python -m mlx_gdn.bench`: every available GDN path and installed peer, side by side."""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import List, Optional

from rich.console import Console

from . import report
from .check import TOLERANCE
from .compare import compare
from .contenders import Contender, discover
from .env import device_kind, environment
from .run import Settings, run
from .shapes import DTYPES, PRESETS, configs, default_sweep, resolve_shapes
from .timing import copy_bandwidth

SCHEMA = "mlx-gdn-bench/1"


def _ints(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_gdn.bench",
        description="Time every available Gated DeltaNet path on MLX's default device, checked against "
                    "a float64 reference first. Defaults depend on the device (CPU or GPU).",
    )
    p.add_argument("--quick", action="store_true", help="a small sweep (under two minutes on a 2-core CPU)")
    p.add_argument("--serving", action="store_true",
                   help="the serving benchmark instead (pooled decode step, packed prefill; see mlx_gdn.bench.serving)")
    p.add_argument("--preset", action="append", choices=[*PRESETS, "all"], help="layer shape (repeatable), (Hk, Hv, Dk, Dv): " + "; ".join(f"{n} {d}" for n, d in PRESETS.items()))
    p.add_argument("--hk", type=int, help="key heads (free shape)")
    p.add_argument("--hv", type=int, help="value heads (free shape)")
    p.add_argument("--dk", type=int, help="key head dim (free shape)")
    p.add_argument("--dv", type=int, help="value head dim (free shape)")
    p.add_argument("--batch", type=_ints, help="batch sizes, e.g. 1,4,16")
    p.add_argument("--tokens", type=_ints, help="tokens per call T, e.g. 1,64,512,4096")
    p.add_argument("--dtype", type=lambda s: s.split(","), help=f"input dtypes from {','.join(DTYPES)}")
    p.add_argument("--only", action="append", help="regex on contender names (repeatable)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per cell and contender")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--max-call", type=float, help="skip cells whose call is predicted slower (seconds)")
    p.add_argument("--sets", type=int, default=3, help="pre-generated input sets rotated among")
    p.add_argument("--tol-f32", type=float, default=TOLERANCE["float32"],
                   help="relative error a float32 run may have against the float64 reference")
    p.add_argument("--tol-bf16", type=float, default=TOLERANCE["bfloat16"],
                   help="relative error a bfloat16/float16 run may have")
    p.add_argument("--gpu-time", action="store_true",
                   help="also read each call's GPU time per kernel from CUPTI (NVIDIA GPU, torch installed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", help="record this commit (for a copy on another machine, whose git metadata may be stale or absent)")
    p.add_argument("--copy-mib", type=int, help="size of the copy-bandwidth probe")
    p.add_argument("--json", metavar="PATH", help="write environment and every measurement")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time vs T per contender")
    p.add_argument("--md", metavar="PATH", help="write the command, commit and table as Markdown")
    p.add_argument("--list", action="store_true", help="list the contenders found here and exit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two recorded runs side by side")
    return p


def _select(found: List[Contender], patterns: Optional[List[str]]) -> List[Contender]:
    if not patterns:
        return found
    return [c for c in found if any(re.search(p, c.name) for p in patterns)]


def main(argv: Optional[List[str]] = None, extra_contenders: Optional[List[Contender]] = None,
         console: Optional[Console] = None) -> dict:
    """Run the CLI; returns the record that --json writes (empty for --list / --compare)."""
    if "--serving" in (sys.argv[1:] if argv is None else argv):
        from .serving import main as serving_main

        return serving_main(sys.argv[1:] if argv is None else argv, console)
    args = parser().parse_args(argv)
    # A pipe gets a wide table rather than rich's 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    if args.compare:
        compare(*args.compare, console)
        return {}
    found = _select(discover(extra_contenders), args.only)
    if args.list:
        for c in found:
            console.print(f"{c.name:32s} {c.gating:12s} {c.description}")
        return {}
    kind = device_kind()
    sweep = default_sweep(kind, args.quick)
    shapes = resolve_shapes(args.preset or sweep["presets"],
                            {"hk": args.hk, "hv": args.hv, "dk": args.dk, "dv": args.dv})
    cells = configs(shapes, args.batch or sweep["batch"], args.tokens or sweep["tokens"], args.dtype or sweep["dtypes"])
    gpu = kind == "gpu"
    settings = Settings(
        budget=args.budget if args.budget is not None else (0.3 if args.quick else 0.5) if gpu else (0.2 if args.quick else 0.5),
        min_reps=args.min_reps, max_reps=args.max_reps,
        max_call=args.max_call if args.max_call is not None else (10.0 if gpu else 5.0),
        sets=args.sets, seed=args.seed, gpu_time=args.gpu_time,
        tolerance={"float32": args.tol_f32, "bfloat16": args.tol_bf16, "float16": args.tol_bf16},
    )
    env = environment()
    if args.commit:  # a copy on another machine may carry stale or no git metadata
        env["git_commit"], env["git_dirty"] = args.commit, False
    console.print(f"[bold]mlx-gdn bench[/] on {env['device']} (mlx {env['versions']['mlx']}); "
                  f"{len(cells)} cells x {len(found)} contenders")
    copy_mib = args.copy_mib or (512 if gpu else 64)
    copy = copy_bandwidth(copy_mib << 20, budget=0.5 if args.quick else 1.0, host=not gpu)
    console.print(f"copy bandwidth ({copy['op']}, {copy_mib} MiB): {copy['GBps']:.1f} GB/s"
                  + (f" (mlx x + 1: {copy['mlx_GBps']:.1f} GB/s)" if "host_copy_GBps" in copy else ""))
    t0 = time.perf_counter()
    results = run(cells, found, settings, copy=copy, progress=not args.no_progress)
    env["elapsed_s"] = round(time.perf_counter() - t0, 1)
    env["load_average_end"] = list(__import__("os").getloadavg()) if hasattr(__import__("os"), "getloadavg") else None
    record = {
        "schema": SCHEMA,
        "environment": env,
        "settings": {**vars(settings), "quick": args.quick},
        "copy_bandwidth": copy,
        "contenders": [c.info() for c in found],
        "results": results,
    }
    title = f"{env['device']} | mlx {env['versions']['mlx']} | commit {str(env['git_commit'])[:10]}"
    report.print_table(results, console, title)
    console.print("x mlx-lm: time of mlx-lm's default entry point on this device / this time. "
                  "GB/s: bytes that must move (state read+write, inputs and y once) / time.")
    if args.json:
        report.write_json(args.json, record)
        console.print(f"wrote {args.json}")
    if args.plot:
        report.plot(results, args.plot, title)
        console.print(f"wrote {args.plot}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# mlx-gdn bench: {env['device']}\n\n")
            f.write(f"- command: `{env['command']}`\n- commit: `{env['git_commit']}`"
                    f"{' (uncommitted changes)' if env['git_dirty'] else ''}\n- date: {env['date']}\n")
            f.write(f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}\n")
            f.write(f"- copy bandwidth ({copy['op']}, {copy_mib} MiB): {copy['GBps']:.1f} GB/s\n")
            f.write(f"- load average at start / end: {env['load_average']} / {env['load_average_end']}\n\n")
            f.write(report.markdown(results))
        console.print(f"wrote {args.md}")
    return record


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
