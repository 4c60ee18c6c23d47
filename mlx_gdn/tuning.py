"""Per-device tuning results: where they live, whose they are, and what `algorithm="auto"` reads.

`python -m mlx_gdn.tune` measures, on the machine it runs on, from which prompt length T each
backend's chunked form beats its recurrent one, per dtype, and stores that here. The file holds one
entry per device (device type and name, e.g. "gpu Apple M3 Max"), each stamped with the MLX and
mlx-gdn versions it was measured with:

    {"format": 1, "devices": {"cpu AMD EPYC": {"mlx": "0.32.4", "mlx_gdn": "0.1.0", "measured": ...,
        "shape": {...}, "backends": {"ops": {"float32": {"chunked_from_t": 16, "times_ms": {...}}}}}}}

`crossover(backend, dtype)` answers from the entry of the current device only when both versions
match; otherwise (no file, another device, another version, an unreadable file) it answers None
and `backends` keeps its built-in table. The file is read once per process; `reload()` forgets it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ._version import __version__

FORMAT = 1
_ENV = "MLX_GDN_CACHE"
# Default device type -> that device's valid entry (dict) or None; filled on first use.
_loaded: dict = {}


def cache_path() -> Path:
    """$MLX_GDN_CACHE (a file, or a directory to hold tuning.json), else ~/.cache/mlx_gdn/tuning.json
    (under $XDG_CACHE_HOME when set)."""
    env = os.environ.get(_ENV)
    if env:
        p = Path(env).expanduser()
        return p / "tuning.json" if p.is_dir() or env.endswith(os.sep) else p
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx_gdn" / "tuning.json"


def device_name() -> str:
    """The default device as tuning results are keyed: its type and name ("cpu AMD EPYC")."""
    dev = mx.default_device()
    name = ""
    try:
        info = mx.device_info()
        name = str(info.get("device_name") or info.get("architecture") or "")
    except Exception:  # noqa: BLE001 (older MLX: no device_info)
        pass
    return f"{'gpu' if dev.type == mx.gpu else 'cpu'} {name or 'unknown'}".strip()


def versions() -> dict:
    """The versions an entry must match to be used."""
    return {"mlx": mx.__version__, "mlx_gdn": __version__}


def read(path: Optional[Path] = None) -> dict:
    """The whole file as a dict ({"format": 1, "devices": {}} when absent or unreadable)."""
    p = Path(path) if path is not None else cache_path()
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {"format": FORMAT, "devices": {}}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("devices"), dict):
        return {"format": FORMAT, "devices": {}}
    return data


def write_entry(entry: dict, path: Optional[Path] = None, device: Optional[str] = None) -> Path:
    """Store `entry` as the current device's (other devices' entries are kept); atomic replace."""
    p = Path(path) if path is not None else cache_path()
    data = read(p)
    data["devices"][device or device_name()] = dict(entry, **versions())
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, p)
    reload()
    return p


def remove(path: Optional[Path] = None, device: Optional[str] = None, everything: bool = False) -> bool:
    """Forget the current device's entry (or the whole file); True if something was removed."""
    p = Path(path) if path is not None else cache_path()
    if everything:
        existed = p.exists()
        p.unlink(missing_ok=True)
        reload()
        return existed
    data = read(p)
    found = data["devices"].pop(device or device_name(), None) is not None
    if found:
        p.write_text(json.dumps(data, indent=1, sort_keys=True))
    reload()
    return found


def current_entry() -> Optional[dict]:
    """The current device's entry if its versions match this process's; read once per device type."""
    kind = mx.default_device().type
    if kind not in _loaded:
        entry = read()["devices"].get(device_name())
        ok = isinstance(entry, dict) and all(entry.get(k) == v for k, v in versions().items())
        _loaded[kind] = entry if ok else None
    return _loaded[kind]


def crossover(backend: str, dtype: str):
    """(found, T): the tuned smallest T at which `backend` runs the chunked form for `dtype`
    ("float32", "bfloat16", "float16"), T None meaning never; found False when no valid tuning
    covers it."""
    entry = current_entry()
    if entry is None:
        return False, None
    per_backend = entry.get("backends")
    per_dtype = per_backend.get(backend) if isinstance(per_backend, dict) else None
    cell = per_dtype.get(dtype) if isinstance(per_dtype, dict) else None
    if not isinstance(cell, dict) or "chunked_from_t" not in cell:
        return False, None
    t0 = cell["chunked_from_t"]
    if t0 is not None and (isinstance(t0, bool) or not isinstance(t0, int) or t0 < 1):
        return False, None  # a hand-edited or damaged value: the built-in table answers
    return True, t0


def reload() -> None:
    """Read the file again at next use (and forget routes chosen under the old answer)."""
    _loaded.clear()
    for forget in _ON_RELOAD:
        forget()


# Callbacks run by `reload` (the backends register their plan cache's clearing: routes chosen
# under the old answer must not outlive it).
_ON_RELOAD: list = []


def on_reload(forget) -> None:
    """Run `forget()` whenever `reload` drops the loaded file."""
    _ON_RELOAD.append(forget)
