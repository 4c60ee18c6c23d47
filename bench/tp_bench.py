"""Tensor parallelism: a Qwen3.5-9B-shaped model sharded by mlx-lm's `model.shard()` over two GPUs
(MLX's NCCL backend, one process per GPU), patched before and after sharding, against one GPU.

    PYTHONUNBUFFERED=1 python bench/tp_bench.py --json tp.json            # needs 2 NVIDIA GPUs
    python bench/tp_bench.py --backend ring --layers 4 --hidden 256 ...    # the same on CPUs

For each sharded mode (patch then shard, shard then patch, unpatched) both ranks build the same
random bf16 model (same seed), rank 0 compares the logits of a `--check`-token prompt with the
single-device patched model's (relative error; bf16 tolerance 2e-2), and times a `--prompt`-token
prefill and `--decode` greedy tokens after a `--context`-token prefill (bench/model_bench.py's
method). The workers are started by this script with the environment `mlx.launch` would give them
(MLX_RANK, MLX_WORLD_SIZE, NCCL_HOST_IP/NCCL_PORT or a ring hostfile, CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import mlx.core as mx
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import model_bench  # noqa: E402  (bench/, this script's folder)

import mlx_gdn  # noqa: E402
from mlx_gdn.bench.env import environment  # noqa: E402

MODES = ("patch-then-shard", "shard-then-patch", "unpatched")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(a):
    rng = np.random.default_rng(0)
    return (mx.array(rng.integers(0, a.vocab, a.check))[None], mx.array(rng.integers(0, a.vocab, a.prompt))[None],
            mx.array(rng.integers(0, a.vocab, a.context)))


def measure(model, a) -> dict:
    check, prompt, context = _inputs(a)
    logits = model(check)[0, -1].astype(mx.float32)
    mx.eval(logits)
    row = {"prefill_s": model_bench.mlx_prefill_s(model, prompt, a.reps)}
    row["decode_tok_s"], _ = model_bench.mlx_decode(model, context, a.decode)
    return row, np.array(logits)


def worker(a) -> None:
    group = mx.distributed.init(backend=a.backend, strict=True)
    model = model_bench.mlx_model(a)
    if a.mode == "patch-then-shard":
        mlx_gdn.patch(model)
        model.shard(group)
    elif a.mode == "shard-then-patch":
        model.shard(group)
        mlx_gdn.patch(model)
    else:
        model.shard(group)
    mx.eval(model.parameters())
    row, logits = measure(model, a)
    if group.rank() == 0:
        ref = np.load(a.reference)
        row["logits_rel_err"] = float(np.linalg.norm(logits - ref) / np.linalg.norm(ref))
        with open(a.result, "w") as f:
            json.dump(row, f)


def run_sharded(a, mode, reference, n=2) -> dict:
    result = tempfile.mktemp(suffix=".json")
    port = _free_port()
    base = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--reference", reference,
            "--result", result] + a.passthrough
    env0 = dict(os.environ, MLX_WORLD_SIZE=str(n))
    if a.backend == "nccl":
        env0.update(NCCL_HOST_IP="127.0.0.1", NCCL_PORT=str(port))
    else:
        hostfile = tempfile.mktemp(suffix=".json")
        with open(hostfile, "w") as f:
            json.dump([["127.0.0.1:%d" % _free_port()] for _ in range(n)], f)
        env0["MLX_HOSTFILE"] = hostfile
    procs = []
    for rank in range(n):
        env = dict(env0, MLX_RANK=str(rank))
        if a.backend == "nccl":
            env["CUDA_VISIBLE_DEVICES"] = str(rank)
        procs.append(subprocess.Popen(base, env=env))
    codes = [p.wait(timeout=a.timeout) for p in procs]
    if any(codes):
        return {"error": f"worker exit codes {codes}"}
    with open(result) as f:
        return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--check", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="nccl", choices=("nccl", "ring"))
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--commit")
    ap.add_argument("--json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.passthrough = ["--layers", str(a.layers), "--hidden", str(a.hidden), "--vocab", str(a.vocab), "--check",
                     str(a.check), "--prompt", str(a.prompt), "--context", str(a.context), "--decode", str(a.decode),
                     "--reps", str(a.reps), "--backend", a.backend]
    if a.worker:
        worker(a)
        return
    rows = {}
    model = model_bench.mlx_model(a)
    rows["1 device unpatched"], _ = measure(model, a)
    mlx_gdn.patch(model)
    rows["1 device patched"], ref = measure(model, a)
    del model
    reference = tempfile.mktemp(suffix=".npy")
    np.save(reference, ref)
    for mode in MODES:
        rows[f"2 devices {mode}"] = run_sharded(a, mode, reference)
        print(mode, rows[f"2 devices {mode}"], flush=True)
    for k, v in rows.items():
        print(f"{k:32s} {v}", flush=True)
    if a.json:
        env = environment()
        if a.commit:
            env["git_commit"], env["git_dirty"] = a.commit, False
        args = {k: v for k, v in vars(a).items() if k != "passthrough"}
        with open(a.json, "w") as f:
            json.dump({"environment": env, "args": args, "results": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
