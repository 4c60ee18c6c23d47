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


@lru_cache(maxsize=None)
def compact(text: str) -> str:
    """`text` without `//` comments, indentation or blank lines; the same program.

    MLX's CUDA backend rebuilds and hashes a custom kernel's whole source on every call, so
    shorter text is less host work per launch. The kernel sources use no block comments and
    no `//` inside string literals (asserted here).
    """
    if "/*" in text:
        raise ValueError("compact() does not handle block comments")
    out = []
    for line in text.splitlines():
        cut = line.find("//")
        if cut >= 0:
            if '"' in line[cut:]:
                raise ValueError(f"compact() cannot tell a comment from a string in: {line!r}")
            line = line[:cut]
        line = line.strip()
        if line:
            out.append(line)
    return "\n".join(out) + "\n"
