"""The environment a run is recorded with: device, versions, commit, command line."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import mlx.core as mx


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def device_kind() -> str:
    """"gpu" when MLX's default device is a GPU (Metal or CUDA), else "cpu"."""
    return "gpu" if mx.default_device().type == mx.gpu else "cpu"


def device_backend() -> str:
    if device_kind() == "cpu":
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "gpu"


def device_name() -> str:
    try:
        info = mx.device_info()
    except Exception:
        info = {}
    name = info.get("device_name") or info.get("name") or platform.processor() or "?"
    return f"{device_backend()}: {name}"


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def environment() -> dict:
    """Everything needed to say where and how a result was measured."""
    try:
        info = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in mx.device_info().items()}
    except Exception:
        info = {}
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "device_kind": device_kind(),
        "device_backend": device_backend(),
        "device_info": info,
        "versions": {
            "mlx": mx.__version__,
            "mlx-lm": _version("mlx-lm"),
            "mlx-gdn": _version("mlx-gdn"),
            "torch": _version("torch"),
            "fla": _version("flash-linear-attention") or _version("fla-core"),
            "numpy": _version("numpy"),
            "python": platform.python_version(),
        },
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if dirty is None else bool(dirty),
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
    }
