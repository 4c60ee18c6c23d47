"""The record the benchmark keeps for each way to compute the layer (no contender defined here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple

from .inputs import InputSet
from .shapes import Config
from .timing import mlx_sync


def _always(cfg: Config) -> Optional[str]:
    return None


@dataclass
class Contender:
    """One way to compute the layer.

    prepare(inputs) binds one InputSet (converting it if needed, outside the clock) and returns a
    zero-argument call; sync(out) waits for that call's result; result(out) gives (y, state) in the
    package's layout for the reference check. unsupported(cfg) returns a reason or None.
    """

    name: str
    family: str  # "mlx-gdn", "mlx-lm", "mlx", "fla", or anything a caller adds
    gating: str  # "fused" (a, b, A_log, dt_bias in) or "precomputed" (g, beta in)
    prepare: Callable[[InputSet], Callable[[], Any]]
    description: str = ""
    unsupported: Callable[[Config], Optional[str]] = _always
    sync: Callable[[Any], None] = mlx_sync
    result: Callable[[Any], Tuple[Any, Any]] = lambda out: (out[0], out[1])
    baseline: bool = False  # the speed-up column divides this one's time by the others'
    route: Optional[Tuple[str, str]] = None  # (backend, algorithm) for this package's paths
    meta: dict = field(default_factory=dict)

    def info(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "gating": self.gating,
            "description": self.description,
            "baseline": self.baseline,
            "route": list(self.route) if self.route else None,
        }
