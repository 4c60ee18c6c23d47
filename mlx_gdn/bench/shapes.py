"""Layer shapes of real models, and the sweeps the benchmark runs over them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import product
from typing import Dict, Iterable, List, Sequence, Tuple

# name -> (Hk, Hv, Dk, Dv). Qwen3-Next-80B-A3B has the same linear-attention heads as the
# Qwen3.5 layer; it keeps its own name so results can be labelled by model.
PRESETS: Dict[str, Tuple[int, int, int, int]] = {
    "qwen3.5": (16, 32, 128, 128),
    "qwen3.5-hv48": (16, 48, 128, 128),
    "qwen3.5-hv64": (16, 64, 128, 128),
    "qwen3-next": (16, 32, 128, 128),
    "dk192": (16, 32, 192, 128),
}
DTYPES = ("bfloat16", "float32", "float16")


@dataclass(frozen=True)
class Config:
    """One benchmark cell: a layer shape, batch, tokens per call and input dtype."""

    shape: str
    B: int
    T: int
    Hk: int
    Hv: int
    Dk: int
    Dv: int
    dtype: str

    @property
    def key(self) -> str:
        """Stable identifier used to match cells across runs."""
        return f"{self.shape}[{self.Hk},{self.Hv},{self.Dk},{self.Dv}] B{self.B} T{self.T} {self.dtype}"

    @property
    def group(self) -> str:
        """Everything but T: one line in the time-vs-T plot."""
        return f"{self.shape} B{self.B} {self.dtype}"

    def to_dict(self) -> dict:
        return asdict(self)


# Sweeps per (device kind, quick). CPU sizes are small because MLX's CPU ops path takes
# about 1.6 ms per token at the Qwen3.5 shape on a 2-core machine.
DEFAULT_SWEEPS = {
    ("cpu", True): dict(presets=["qwen3.5"], batch=[1], tokens=[1, 64, 256], dtypes=["bfloat16"]),
    ("cpu", False): dict(presets=["qwen3.5"], batch=[1], tokens=[1, 64, 512], dtypes=["bfloat16", "float32"]),
    ("gpu", True): dict(presets=["qwen3.5"], batch=[1], tokens=[1, 512, 4096], dtypes=["bfloat16"]),
    ("gpu", False): dict(
        presets=["qwen3.5"], batch=[1, 4, 16], tokens=[1, 64, 512, 4096], dtypes=["bfloat16", "float32"]
    ),
}


def default_sweep(device_kind: str, quick: bool) -> dict:
    """Presets, batch sizes, token counts and dtypes run when no flag overrides them."""
    kind = "gpu" if device_kind == "gpu" else "cpu"
    return {k: list(v) for k, v in DEFAULT_SWEEPS[(kind, bool(quick))].items()}


def resolve_shapes(presets: Sequence[str], custom: Dict[str, int | None]) -> List[Tuple[str, Tuple[int, int, int, int]]]:
    """(name, dims) per requested shape. Any of hk/hv/dk/dv given makes one custom shape
    (unset dims taken from the first preset); "all" expands to every distinct preset shape."""
    names: List[str] = []
    for p in presets:
        names.extend(PRESETS if p == "all" else [p])
    for n in names:
        if n not in PRESETS:
            raise ValueError(f"unknown preset {n!r}; known: {', '.join(PRESETS)}, all")
    if any(custom.get(d) is not None for d in ("hk", "hv", "dk", "dv")):
        base = PRESETS[names[0]] if names else PRESETS["qwen3.5"]
        dims = tuple(custom.get(d) or base[i] for i, d in enumerate(("hk", "hv", "dk", "dv")))
        if dims[1] % dims[0]:
            raise ValueError(f"--hv {dims[1]} must be a multiple of --hk {dims[0]}")
        return [("custom", dims)]
    out, seen = [], set()
    for n in dict.fromkeys(names):
        # "all" would run Qwen3-Next twice under two names; one run per distinct shape.
        if PRESETS[n] in seen and "all" in presets:
            continue
        seen.add(PRESETS[n])
        out.append((n, PRESETS[n]))
    return out


def configs(shapes: Iterable[Tuple[str, Tuple[int, int, int, int]]], batch, tokens, dtypes) -> List[Config]:
    """Cartesian sweep, ordered so each (shape, B, dtype) line is filled from small T up."""
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"unknown dtype {dt!r}; known: {', '.join(DTYPES)}")
    out = []
    for (name, (hk, hv, dk, dv)), dt, b, t in product(shapes, dtypes, sorted(batch), sorted(tokens)):
        if b < 1 or t < 1:
            raise ValueError(f"batch and tokens must be >= 1, got B={b}, T={t}")
        out.append(Config(name, b, t, hk, hv, dk, dv, dt))
    return out
