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
_depth = 0
_original = None


def active() -> bool:
    """True while at least one ``simulated_metal()`` context is open."""
    return _depth > 0


@contextlib.contextmanager
def simulated_metal():
    """Context manager routing ``mx.fast.metal_kernel`` to the CPU simulator.

    Nests safely; the original function is restored when the outermost context
    exits, also on exceptions.
    """
    global _depth, _original
    with _state_lock:
        if _depth == 0:
            _original = mx.fast.metal_kernel
            mx.fast.metal_kernel = metal_kernel
            _availability_changed()
        _depth += 1
    try:
        yield metal_kernel
    finally:
        with _state_lock:
            _depth -= 1
            if _depth == 0:
                mx.fast.metal_kernel = _original
                _original = None
                _availability_changed()


_cuda_depth = 0
_cuda_original = None


def cuda_active() -> bool:
    """True while at least one ``simulated_cuda()`` context is open."""
    return _cuda_depth > 0


@contextlib.contextmanager
def simulated_cuda():
    """Context manager routing ``mx.fast.cuda_kernel`` to the CPU simulator (`cuda_kernel`); the
    package's "cuda" backend counts as available inside it. Nests; restores on exit."""
    global _cuda_depth, _cuda_original
    with _state_lock:
        if _cuda_depth == 0:
            _cuda_original = getattr(mx.fast, "cuda_kernel", None)
            mx.fast.cuda_kernel = cuda_kernel
            _availability_changed()
        _cuda_depth += 1
    try:
        yield cuda_kernel
    finally:
        with _state_lock:
            _cuda_depth -= 1
            if _cuda_depth == 0:
                if _cuda_original is None:
                    del mx.fast.cuda_kernel
                else:
                    mx.fast.cuda_kernel = _cuda_original
                _cuda_original = None
                _availability_changed()


def _availability_changed():
    # A simulated backend appears or disappears: routes and kernel objects remembered by the
    # package (mlx_gdn.backends) were chosen for the other state.
    from mlx_gdn import backends

    backends.clear_plans()
