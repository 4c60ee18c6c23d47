"""Kernel bodies shipped as files in ``kernels/`` (installed as ``mlx_gdn.kernels``)."""

from functools import lru_cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Installed wheel: mlx_gdn/kernels; source checkout: <repo>/kernels.
_CANDIDATES = (_HERE / "kernels", _HERE.parent / "kernels")


def kernel_dir() -> Path:
    """The directory holding the kernel source files."""
    for d in _CANDIDATES:
        if d.is_dir() and any(d.glob("*.metal")):
            return d
    for d in _CANDIDATES:
        if d.is_dir():
            return d
    raise FileNotFoundError(f"mlx_gdn kernel sources not found in {[str(c) for c in _CANDIDATES]}")


@lru_cache(maxsize=None)
def load(name: str) -> str:
    """Text of ``kernels/<name>`` (e.g. ``"recurrent.metal"``)."""
    path = kernel_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {name!r} not found in {kernel_dir()}")
    return path.read_text()
