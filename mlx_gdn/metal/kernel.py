"""Kernel objects on Metal: `mx.fast.metal_kernel` objects built once per launch spec.

Inside `mlx_gdn.sim.simulated_metal()`, `mx.fast.metal_kernel` is the simulator's; the factory
is part of the cache key, so kernels built there are kept apart from real ones.
"""

from __future__ import annotations

from typing import Dict, Tuple

import mlx.core as mx

from .. import launch

# (kernel factory, name, header, source) -> kernel object. The factory is part of the key so a
# kernel built under the simulator is never reused outside it (and the other way round);
# MLX itself compiles each kernel once per template instantiation.
_KERNELS: Dict[Tuple, object] = {}


def simulated() -> bool:
    """True inside `mlx_gdn.sim.simulated_metal()`."""
    try:
        from .. import sim
    except ImportError:
        return False
    active = getattr(sim, "active", None)
    return bool(active()) if active is not None else False


def kernel(spec: launch.LaunchSpec):
    """The `mx.fast.metal_kernel` object for `spec`, built once per (factory, source)."""
    factory = mx.fast.metal_kernel
    header, source = spec.header(), spec.source()
    key = (factory, spec.name, header, source, spec.ensure_row_contiguous)
    kern = _KERNELS.get(key)
    if kern is None:
        kern = factory(
            name=spec.name,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            source=source,
            header=header,
            ensure_row_contiguous=spec.ensure_row_contiguous,
        )
        _KERNELS[key] = kern
    return kern
