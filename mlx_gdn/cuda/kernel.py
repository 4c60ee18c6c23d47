"""Kernel objects on MLX's CUDA backend: the Metal-vocabulary prelude, `mx.fast.cuda_kernel`
objects built once per source, and the text MLX compiles (for offline compile checks).

Inside `mlx_gdn.sim.simulated_cuda()`, `mx.fast.cuda_kernel` is the simulator's, and kernels
built there are kept apart from real ones (the factory is part of the cache key).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Sequence, Tuple

import mlx.core as mx

from .. import launch
from ..launch import compact, load

PRELUDE = "cuda_prelude.h"

_KERNELS: Dict[Tuple, object] = {}
_DUMMY: Dict[str, mx.array] = {}


def simulated() -> bool:
    """True inside `mlx_gdn.sim.simulated_cuda()`."""
    try:
        from .. import sim
    except ImportError:
        return False
    return bool(sim.cuda_active())


def _device() -> bool:
    try:
        return bool(mx.cuda.is_available())
    except AttributeError:
        return False


def _kernel(kname: str, input_names: Sequence[str], output_names: Sequence[str], source: str, header: str,
            smem: int = 0):
    factory = mx.fast.cuda_kernel  # the simulator's inside simulated_cuda()
    key = (factory, kname, header, source, smem)
    kern = _KERNELS.get(key)
    if kern is None:
        kern = factory(
            name=kname,
            input_names=list(input_names),
            output_names=list(output_names),
            source=source,
            header=header,
            ensure_row_contiguous=True,
            shared_memory=smem,
        )
        _KERNELS[key] = kern
    return kern


def source_text(name: str) -> str:
    """kernels/<name> as CUDA launches get it: without comments and indentation.

    MLX's CUDA backend rebuilds and hashes each custom kernel's whole text on every call, so the
    text's length is host time per launch (`launch.compact`).
    """
    return compact(load(name))


def recurrent_header(spec: launch.LaunchSpec) -> str:
    """Prelude, then the spec's variant macros and headers (compacted)."""
    return _with_prelude(spec.header())


@lru_cache(maxsize=None)
def _with_prelude(header: str) -> str:
    # Cached: the same text object each call keeps the kernel-cache key's hash precomputed.
    return compact(load(PRELUDE) + "\n" + header)


def kernel_for_spec(spec: launch.LaunchSpec):
    """The `mx.fast.cuda_kernel` object for a shared Metal-vocabulary body (prelude first)."""
    return _kernel(spec.name, spec.input_names, spec.output_names, compact(spec.source()), recurrent_header(spec))


def _dummy() -> mx.array:
    arr = _DUMMY.get("f32")
    if arr is None:
        arr = mx.zeros((1,), dtype=mx.float32)
        _DUMMY["f32"] = arr
    return arr


# Source as MLX builds it (for offline compile checks; mirrors mlx/backend/cuda/custom_kernel.cpp)

_CUDA_TYPES = {
    "float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "bool": "bool",
    "int32": "int32_t", "uint32": "uint32_t", "int64": "int64_t", "uint8": "uint8_t",
}


def cuda_type(dtype) -> str:
    """CUDA spelling of an MLX dtype, as MLX writes kernel signatures."""
    return _CUDA_TYPES[str(dtype).replace("mlx.core.", "")]


def kernel_text(kname: str, header: str, source: str, inputs: Sequence[Tuple[str, object, int]],
                outputs: Sequence[Tuple[str, object]], template: Sequence[Tuple[str, object]]) -> str:
    """The text MLX compiles for one `mx.fast.cuda_kernel` call, minus MLX's own include line.

    inputs: (name, dtype, ndim); outputs: (name, dtype); template: (name, int | bool | dtype).
    """
    out = [header, "namespace mlx::core::cu {\n", "namespace cg = cooperative_groups;\n",
           f"__global__ void {kname}("]
    params = []
    for nm, dt, nd in inputs:
        params.append(f"    const {cuda_type(dt)}* {nm}")
        if nd > 0:
            if nm + "_shape" in source:
                params.append(f"    const __grid_constant__ Shape {nm}_shape")
            if nm + "_strides" in source:
                params.append(f"    const __grid_constant__ Strides {nm}_strides")
            if nm + "_ndim" in source:
                params.append(f"    const __grid_constant__ int {nm}_ndim")
    for nm, dt in outputs:
        params.append(f"    {cuda_type(dt)}* {nm}")
    out.append(",\n".join(params) + ") {\n")
    for nm, val in template:
        if isinstance(val, bool):
            out.append(f"  constexpr bool {nm} = {'true' if val else 'false'};\n")
        elif isinstance(val, int):
            out.append(f"  constexpr int {nm} = {val};\n")
        else:
            out.append(f"  using {nm} = {cuda_type(val)};\n")
    out.append(source)
    out.append("\n}\n\n} // namespace mlx::core::cu\n")
    return "".join(out)
