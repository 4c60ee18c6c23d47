"""CPU simulator for ``mx.fast.metal_kernel`` (and the CUDA-only kernels).

``with simulated_metal():`` replaces ``mx.fast.metal_kernel`` by a factory with
the same constructor and call signature whose kernels are compiled as C++ and
run on the CPU, with Metal's threadgroup / simdgroup semantics, bounds-checked
device buffers and NaN-poisoned outputs. ``with simulated_cuda():`` does the
same for ``mx.fast.cuda_kernel`` and the kernels written in CUDA (blocks, warps,
shared memory, mma.sync, ldmatrix, cp.async; see cuda_vocab.h).
"""

from __future__ import annotations

import contextlib
import threading

import mlx.core as mx

from ._core import (
    INT_POISON_BYTE,
    STATS,
    SimCompileError,
    SimError,
    SimKernelError,
    SimMetalKernel,
    SimOutOfBoundsError,
    cache_dir,
    cuda_kernel,
    metal_kernel,
)

__all__ = [
    "INT_POISON_BYTE",
    "STATS",
    "SimCompileError",
    "SimError",
    "SimKernelError",
    "SimMetalKernel",
    "SimOutOfBoundsError",
    "active",
    "cache_dir",
    "cuda_active",
    "cuda_kernel",
    "metal_kernel",
    "simulated_cuda",
    "simulated_metal",
]

_state_lock = threading.RLock()
# Factory name in mx.fast -> (open contexts, the factory it replaced)
_depth = {"metal_kernel": 0, "cuda_kernel": 0}
_original: dict = {}


def active() -> bool:
    """True while at least one ``simulated_metal()`` context is open."""
    return _depth["metal_kernel"] > 0


def cuda_active() -> bool:
    """True while at least one ``simulated_cuda()`` context is open."""
    return _depth["cuda_kernel"] > 0


@contextlib.contextmanager
def _routed(factory: str, replacement):
    # Nests; the original factory comes back when the outermost context exits, also on exceptions.
    with _state_lock:
        if _depth[factory] == 0:
            _original[factory] = getattr(mx.fast, factory, None)
            setattr(mx.fast, factory, replacement)
            _availability_changed()
        _depth[factory] += 1
    try:
        yield replacement
    finally:
        with _state_lock:
            _depth[factory] -= 1
            if _depth[factory] == 0:
                original = _original.pop(factory)
                if original is None:
                    delattr(mx.fast, factory)
                else:
                    setattr(mx.fast, factory, original)
                _availability_changed()


def simulated_metal():
    """Context manager routing ``mx.fast.metal_kernel`` to the CPU simulator; the package's
    "metal" backend counts as available inside it. Nests safely."""
    return _routed("metal_kernel", metal_kernel)


def simulated_cuda():
    """Context manager routing ``mx.fast.cuda_kernel`` to the CPU simulator (`cuda_kernel`); the
    package's "cuda" backend counts as available inside it. Nests safely."""
    return _routed("cuda_kernel", cuda_kernel)


def _availability_changed():
    # A simulated backend appears or disappears: routes and kernel objects remembered by the
    # package (mlx_gdn.backends) were chosen for the other state.
    from mlx_gdn import backends

    backends.clear_plans()
