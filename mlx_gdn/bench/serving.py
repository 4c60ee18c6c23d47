"""`python -m mlx_gdn.bench --serving`: a server's two calls, timed.

- decode: one continuous-batching step, B sequences of one token each reading and writing rows
  of a state pool of S slots (`state_indices`, `check_values=False`, the pool rebound to the
  result so MLX updates it in place); the same step against a small pool shows whether the cost
  grows with S. Peers: the same step as gather, plain call, scatter (what a caller does without
  `state_indices`); fla's fused_recurrent with torch indexing around it, where fla is installed.
- states: the cost of return_states=C on the chunked kernels (a plain chunked call against the
  same call with return_states=C, C = 64 and 256 on the GPU) at B = 1 and 4, T = 8192.
- prefill: sequences of mixed lengths packed along T (`cu_seqlens`; algorithm "auto", and
  "recurrent": one launch of the recurrent kernel over all sequences), against the same
  sequences one plain call each and fla's chunk_gated_delta_rule with cu_seqlens, where installed.

With `--gpu-time` (NVIDIA, torch installed) each cell also reports its kernel time and kernel launches
per call from CUPTI (`gpu_time`), which splits a step's GPU work from its host time.

Every contender's output is checked against the plain per-sequence calls of this package
(themselves tested against the float64 reference) before it is timed.
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np
from rich.console import Console
from rich.table import Table

import mlx_gdn

from . import gpu_time
from .env import device_kind, environment
from .shapes import PRESETS
from .timing import mlx_sync, time_calls

SCHEMA = "mlx-gdn-bench-serving/1"
_DT = {"bfloat16": mx.bfloat16, "float32": mx.float32, "float16": mx.float16}


def sweep(kind: str, quick: bool) -> dict:
    """Cells by device: GPU sizes from a server's working set, tiny ones on the CPU."""
    if kind == "gpu" and not quick:
        return dict(shape=PRESETS["qwen3.5"], batch=64, pools=(64, 1024),
                    packs=((28672, 4096), (16384, 16384), (1024, 7168)), dtype="bfloat16",
                    states=dict(batches=(1, 4), T=8192, every=(64, 256)))
    return dict(shape=(2, 4, 64, 64), batch=8, pools=(16, 1024), packs=((48, 16), (1, 31, 0, 8)), dtype="float32",
                states=dict(batches=(1, 2), T=256, every=(64, 128)))


def _ints(s: str) -> tuple:
    return tuple(int(v) for v in s.split(",") if v)


def _layer(B, T, shape, dtype, seed):
    """Fused-gating inputs [B, T, ...] of one layer (q, k normalised, q scaled)."""
    from ..testing import random_inputs

    Hk, Hv, Dk, Dv = shape
    return random_inputs(B, T, Hk, Hv, Dk, Dv, dtype=_DT[dtype], seed=seed, with_state=False)


def _rel(a, b) -> float:
    a, b = (np.array(x.astype(mx.float32), dtype=np.float64) for x in (a, b))
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / den) if den else float(np.linalg.norm(a))


def _update(x, state, **kw):
    return mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, state, **kw)


def _fla():
    """(torch, fused_recurrent, chunk) when fla and a CUDA torch are here, else None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception:
        return None
    return torch, fused_recurrent_gated_delta_rule, chunk_gated_delta_rule


def _torch_inputs(torch, x):
    """fla's view of x: q, k, v, beta in x's dtype, log-decay g float32 (from a, dt_bias, A_log)."""
    dt = getattr(torch, str(x.q.dtype).rsplit(".", 1)[-1])
    to = lambda a, d: torch.from_numpy(np.array(a.astype(mx.float32))).to("cuda", d)  # noqa: E731
    xa = np.array(x.a.astype(mx.float32), np.float64) + np.array(x.dt_bias, np.float64)
    g = -np.exp(np.array(x.A_log, np.float64)) * np.logaddexp(0.0, xa)
    beta = 1.0 / (1.0 + np.exp(-np.array(x.b.astype(mx.float32), np.float64)))
    return (to(x.q, dt), to(x.k, dt), to(x.v, dt), torch.from_numpy(g.astype(np.float32)).to("cuda"),
            torch.from_numpy(beta.astype(np.float32)).to("cuda", dt))


def _gpu_fields(gpu: bool, call: Callable, sync: Callable) -> dict:
    """With `gpu`: kernel time (us) and kernel launches per call from CUPTI (`gpu_time`), and the
    kernels by name; empty without it or without CUPTI here."""
    if not gpu:
        return {}
    g = gpu_time.kernel_times([call], sync, reps=20)
    if g is None:
        return {}
    return dict(gpu_us=g["gpu_us"], launches=g["launches"], kernels=g["kernels"])


def decode_cells(cfg: dict, budget: float, seed: int, gpu: bool = False) -> List[dict]:
    """One decode step against each pool size, per contender."""
    B, shape, dtype = cfg["batch"], cfg["shape"], cfg["dtype"]
    Hk, Hv, Dk, Dv = shape
    x = _layer(B, 1, shape, dtype, seed)
    rng = np.random.default_rng(seed)
    rows = []
    fla = _fla()
    for S in cfg["pools"]:
        if S < B:
            continue
        idx_np = rng.permutation(S)[:B].astype(np.int32)
        idx = mx.array(idx_np)
        pool0 = mx.array((rng.standard_normal((S, Hv, Dv, Dk)) * 0.1).astype(np.float32))
        mx.eval(pool0)
        # Expected: a plain call on the gathered rows (checked against float64 elsewhere).
        y_ref, s_ref = _update(x, pool0[idx])
        mx.eval(y_ref, s_ref)
        holder = {"pool": pool0}

        def pooled():
            y, holder["pool"] = _update(x, holder["pool"], state_indices=idx, check_values=False)
            return y, holder["pool"]

        def gathered():
            p = holder["pool"]
            y, s = _update(x, p[idx])
            holder["pool"] = mx.put_along_axis(p, idx.reshape(-1, 1, 1, 1), s, axis=0)
            return y, holder["pool"]

        calls: Dict[str, Callable] = {"mlx_gdn state_indices": pooled, "mlx_gdn gather+call+scatter": gathered}
        sync = {name: mlx_sync for name in calls}
        result = {}
        if fla is not None:
            torch, fused_recurrent, _ = fla
            q, k, v, g, beta = _torch_inputs(torch, x)
            tpool = torch.from_numpy(np.swapaxes(np.array(pool0), -1, -2).copy()).to("cuda")  # [S,Hv,Dk,Dv]
            tidx = torch.from_numpy(idx_np.astype(np.int64)).to("cuda")

            def fla_step():
                y, ht = fused_recurrent(q, k, v, g=g, beta=beta, scale=1.0, initial_state=tpool[tidx],
                                        output_final_state=True, use_qk_l2norm_in_kernel=False)
                tpool.index_copy_(0, tidx, ht)
                return y, ht

            calls["fla fused_recurrent + index_copy"] = fla_step
            sync["fla fused_recurrent + index_copy"] = lambda out: torch.cuda.synchronize()
            result["fla fused_recurrent + index_copy"] = lambda out: (
                mx.array(out[0].float().cpu().numpy()), mx.array(np.swapaxes(out[1].float().cpu().numpy(), -1, -2)))
        for name, call in calls.items():
            # Check first, from the initial pool (each contender's first step).
            holder["pool"] = pool0
            out = call()
            if name in result:
                y, s = result[name](out)
            else:
                y, s = out[0], out[1][idx]
            err = max(_rel(y, y_ref), _rel(s, s_ref))
            r = time_calls([call], sync[name], budget=budget)
            rows.append(dict(mode="decode", contender=name, B=B, S=S, T=1, shape=list(shape), dtype=dtype,
                             median_ms=r["median_s"] * 1e3, reps=r["reps"], rel_err=err,
                             **_gpu_fields(gpu, call, sync[name])))
    return rows


def prefill_cells(cfg: dict, budget: float, seed: int, gpu: bool = False) -> List[dict]:
    """Packed prefill of each length mix, per contender."""
    shape, dtype = cfg["shape"], cfg["dtype"]
    Hk, Hv, Dk, Dv = shape
    rows = []
    fla = _fla()
    for lens in cfg["packs"]:
        T = sum(lens)
        x = _layer(1, T, shape, dtype, seed)
        cu_np = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        cu = mx.array(cu_np)
        N = len(lens)

        def per_sequence():
            ys, ss = [], []
            for n in range(N):
                a, b = int(cu_np[n]), int(cu_np[n + 1])
                if a == b:
                    ss.append(mx.zeros((1, Hv, Dv, Dk)))
                    continue
                sl = slice(a, b)
                y, s = mlx_gdn.gated_delta_update(x.q[:, sl], x.k[:, sl], x.v[:, sl], x.a[:, sl], x.b[:, sl],
                                                  x.A_log, x.dt_bias)
                ys.append(y)
                ss.append(s)
            return mx.concatenate(ys, axis=1), mx.concatenate(ss, axis=0)

        def packed():
            return _update(x, None, cu_seqlens=cu, check_values=False)

        def packed_recurrent():
            return _update(x, None, cu_seqlens=cu, check_values=False, algorithm="recurrent")

        y_ref, s_ref = per_sequence()
        mx.eval(y_ref, s_ref)
        calls: Dict[str, Callable] = {"mlx_gdn cu_seqlens": packed, "mlx_gdn cu_seqlens recurrent": packed_recurrent,
                                      "mlx_gdn call per sequence": per_sequence}
        sync = {name: mlx_sync for name in calls}
        convert = {}
        if fla is not None:
            torch, _, chunk = fla
            q, k, v, g, beta = _torch_inputs(torch, x)
            tcu = torch.from_numpy(cu_np.astype(np.int64)).to("cuda")

            def fla_chunk():
                return chunk(q, k, v, g=g, beta=beta, scale=1.0, initial_state=None, output_final_state=True,
                             cu_seqlens=tcu, use_qk_l2norm_in_kernel=False)

            calls["fla chunk cu_seqlens"] = fla_chunk
            sync["fla chunk cu_seqlens"] = lambda out: torch.cuda.synchronize()
            convert["fla chunk cu_seqlens"] = lambda out: (
                mx.array(out[0].float().cpu().numpy()), mx.array(np.swapaxes(out[1].float().cpu().numpy(), -1, -2)))
        for name, call in calls.items():
            out = call()
            y, s = convert[name](out) if name in convert else out
            err = max(_rel(y, y_ref), _rel(s, s_ref))
            r = time_calls([call], sync[name], budget=budget)
            rows.append(dict(mode="prefill", contender=name, lens=list(lens), T=T, shape=list(shape), dtype=dtype,
                             median_ms=r["median_s"] * 1e3, reps=r["reps"], rel_err=err,
                             Mtok_per_s=T / r["median_s"] / 1e6, **_gpu_fields(gpu, call, sync[name])))
    return rows


def states_cells(cfg: dict, budget: float, seed: int, gpu: bool = False) -> List[dict]:
    """The cost of return_states=C on the chunked kernels: a plain chunked call against the same
    call returning the states after every C tokens, per batch size and C. The states are checked
    against the recurrent kernels' (return_states=C, algorithm "recurrent"), y and the final state
    against the plain call."""
    shape, dtype, st = cfg["shape"], cfg["dtype"], cfg["states"]
    rows = []
    for B in st["batches"] if st["every"] else ():
        x = _layer(B, st["T"], shape, dtype, seed)
        y_ref, s_ref = _update(x, None, algorithm="chunked")
        mx.eval(y_ref, s_ref)
        calls: Dict[str, Callable] = {"mlx_gdn chunked": lambda: _update(x, None, algorithm="chunked")}
        for C in st["every"]:
            calls[f"mlx_gdn chunked return_states={C}"] = lambda C=C: _update(x, None, algorithm="chunked",
                                                                             return_states=C)
        for name, call in calls.items():
            out = call()
            err = max(_rel(out[0], y_ref), _rel(out[1], s_ref))
            C = int(name.rsplit("=", 1)[1]) if "=" in name else 0
            if C:
                _, _, want = _update(x, None, algorithm="recurrent", return_states=C)
                err = max(err, _rel(out[2], want))
                del want
            del out
            r = time_calls([call], mlx_sync, budget=budget)
            rows.append(dict(mode="states", contender=name, B=B, T=st["T"], every=C, shape=list(shape), dtype=dtype,
                             median_ms=r["median_s"] * 1e3, reps=r["reps"], rel_err=err,
                             **_gpu_fields(gpu, call, mlx_sync)))
    return rows


def main(argv: Optional[List[str]] = None, console: Optional[Console] = None) -> dict:
    """Run the serving benchmark; returns the record --json writes."""
    p = argparse.ArgumentParser(prog="python -m mlx_gdn.bench --serving")
    p.add_argument("--serving", action="store_true")
    p.add_argument("--quick", action="store_true", help="CPU-sized cells on any device")
    p.add_argument("--batch", type=int, help="sequences per decode step")
    p.add_argument("--pools", type=lambda s: tuple(int(v) for v in s.split(",")), help="pool sizes S, e.g. 64,1024")
    p.add_argument("--packs", type=lambda s: tuple(tuple(int(v) for v in g.split("+")) for g in s.split(",")),
                   help="packed length mixes, e.g. 28672+4096,1024+7168")
    p.add_argument("--states-batches", type=_ints, help="batch sizes of the return_states cells, e.g. 1,4")
    p.add_argument("--states-T", type=int, help="tokens per sequence of the return_states cells")
    p.add_argument("--states-every", type=_ints, help="return_states=C values, e.g. 64,256 (empty: no such cells)")
    p.add_argument("--dims", type=lambda s: tuple(int(v) for v in s.split(",")), help="Hk,Hv,Dk,Dv")
    p.add_argument("--dtype", choices=tuple(_DT))
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per cell")
    p.add_argument("--gpu-time", action="store_true",
                   help="also read each call's kernel time and kernel launches from CUPTI (NVIDIA GPU, torch installed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", help="record this commit (a copy on another machine may carry stale git metadata)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    console = console or Console(width=160)
    cfg = sweep(device_kind(), args.quick)
    for key, val in (("batch", args.batch), ("pools", args.pools), ("packs", args.packs), ("shape", args.dims),
                     ("dtype", args.dtype)):
        if val is not None:
            cfg[key] = val
    for key, val in (("batches", args.states_batches), ("T", args.states_T), ("every", args.states_every)):
        if val is not None:
            cfg["states"] = dict(cfg["states"], **{key: val})
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 0.5)
    env = environment()
    if args.commit:
        env["git_commit"], env["git_dirty"] = args.commit, False
    gpu = args.gpu_time and gpu_time.available()
    if args.gpu_time and not gpu:
        console.print("--gpu-time: no CUDA device visible to torch here; wall times only")
    rows = (decode_cells(cfg, budget, args.seed, gpu) + prefill_cells(cfg, budget, args.seed, gpu)
            + states_cells(cfg, budget, args.seed, gpu))
    table = Table(title=f"mlx-gdn serving | {env['device']} | shape {cfg['shape']} {cfg['dtype']}")
    for col in ("mode", "contender", "cell", "ms", "rel err") + (("GPU us", "launches") if gpu else ()):
        table.add_column(col)
    for r in rows:
        if r["mode"] == "decode":
            cell = f"B{r['B']} S{r['S']}"
        elif r["mode"] == "states":
            cell = f"B{r['B']} T{r['T']}"
        else:
            cell = "+".join(map(str, r["lens"]))
        extra = (f"{r['gpu_us']:.1f}", f"{r['launches']:.1f}") if "gpu_us" in r else ("-", "-")
        table.add_row(r["mode"], r["contender"], cell, f"{r['median_ms']:.3f}", f"{r['rel_err']:.1e}",
                      *(extra if gpu else ()))
    console.print(table)
    record = {"schema": SCHEMA, "environment": env, "config": {k: v for k, v in cfg.items()}, "budget_s": budget,
              "results": rows}
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)
        console.print(f"wrote {args.json}")
    return record
